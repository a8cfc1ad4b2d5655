"""Linear monocular depth on NYUv2 (paper section 8.4, choices of the official DINOv2/v3 release).

Frozen patch tokens -> BatchNorm -> 1x1 conv to `num_bins` logits; depth is the expectation over
bins spaced uniformly in [min_depth, max_depth] = [0.001, 10] m with "linear" bin weights
(ReLU + 0.1, normalized). Loss: the scale-invariant SigLoss. AdamW lr 3e-4, wd 1e-3.
Metrics per test image on the Eigen crop (rows 45:471, cols 41:601 of 480x640, scaled
proportionally for other sizes) over valid pixels, then averaged: RMSE (metres), abs_rel, delta<1.25.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import ConfigError
from .common import EvalResult, resolve_settings, seed_everything, settings_dict, snap
from .datasets import NYUDepth
from .features import (
    ProbeSchedule,
    patch_features,
    random_crop_flip,
    resize_image,
    resize_nearest,
    to_tensor01,
    train_probe,
)
from .models import load_model

EIGEN_CROP_480x640 = (45, 471, 41, 601)  # top, bottom, left, right


@dataclass
class DepthSettings:
    iterations: int = 38400
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-3
    warmup_iters: int = 0
    resolution: int = 480  # short side the images are resized to (snapped to the stride)
    crop: tuple[float, float] = (0.866, 0.85)  # training crop as a fraction of (H, W): 416x544 of 480x640
    num_bins: int = 256
    min_depth: float = 1e-3
    max_depth: float = 10.0
    eigen_crop: bool = True
    cache_views: int = 0
    cache_refresh: int = 0  # with cache_views: new augmentations every this many iterations (0 = never)
    num_workers: int = 4  # data-loading processes for the probe's training views
    max_val_images: int = 0
    train_list: str = "nyu_train.txt"
    test_list: str = "nyu_test.txt"
    seed: int = 0
    device: str = "auto"


class LinearDepthHead(nn.Module):
    """BatchNorm -> 1x1 conv to bin logits -> expected depth over uniform bins: [B, 1, h, w]."""

    def __init__(self, dim: int, num_bins: int = 256, min_depth: float = 1e-3, max_depth: float = 10.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_bins, 1)
        self.register_buffer("centers", torch.linspace(min_depth, max_depth, num_bins), persistent=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        w = torch.relu(self.conv(self.bn(feats))) + 0.1
        w = w / w.sum(1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", w, self.centers)[:, None]


def sig_loss(
    pred: torch.Tensor, gt: torch.Tensor, min_depth: float = 1e-3, max_depth: float = 10.0
) -> torch.Tensor:
    """Scale-invariant log loss sqrt(Var(g) + 0.15 Mean(g)^2), g = log pred - log gt, valid pixels."""
    pred = F.interpolate(pred, size=gt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    valid = (gt > min_depth) & (gt < max_depth)
    if not valid.any():
        return pred.sum() * 0.0
    g = torch.log(pred[valid].clamp_min(1e-6)) - torch.log(gt[valid])
    return torch.sqrt(g.var(unbiased=False) + 0.15 * g.mean() ** 2 + 1e-12)


def eigen_crop_mask(h: int, w: int) -> np.ndarray:
    """The Eigen evaluation crop for an HxW image, scaled proportionally from 480x640."""
    top, bottom, left, right = EIGEN_CROP_480x640
    mask = np.zeros((h, w), bool)
    mask[round(top * h / 480) : round(bottom * h / 480), round(left * w / 640) : round(right * w / 640)] = (
        True
    )
    return mask


def depth_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """RMSE (metres), abs_rel and delta<1.25 over `mask` pixels of one image."""
    p, g = pred[mask].astype(np.float64), gt[mask].astype(np.float64)
    ratio = np.maximum(p / g, g / p)
    return {
        "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
        "abs_rel": float(np.mean(np.abs(p - g) / g)),
        "delta1": float(np.mean(ratio < 1.25)),
    }


def depth(
    model: Any,
    data: str | os.PathLike,
    weights: str | None = None,
    output_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> EvalResult:
    """Train a linear depth probe on the NYU train list; RMSE on the test list (Eigen crop)."""
    s = resolve_settings(DepthSettings, overrides)
    m = load_model(model, weights, s.device)
    seed_everything(s.seed)
    train, test = NYUDepth(data, s.train_list), NYUDepth(data, s.test_list)
    dim = patch_features(m, torch.zeros(1, 3, m.stride, m.stride)).shape[1]
    head = LinearDepthHead(dim, s.num_bins, s.min_depth, s.max_depth)

    def view(i: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        image, gt = train[i]
        size = _input_size(*gt.shape, s.resolution, m.stride)
        img = resize_image(to_tensor01(image), size)
        d = resize_nearest(torch.from_numpy(gt), size)
        crop = (snap(size[0] * s.crop[0], m.stride), snap(size[1] * s.crop[1], m.stride))
        return random_crop_flip(img, d, (min(crop[0], size[0]), min(crop[1], size[1])), 0.0, rng)

    def loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        return sig_loss(pred, gt, s.min_depth, s.max_depth)

    sched = ProbeSchedule(
        s.iterations,
        s.batch_size,
        s.lr,
        s.weight_decay,
        s.warmup_iters,
        s.cache_views,
        s.seed,
        s.num_workers,
        s.cache_refresh,
    )
    timing = train_probe(m, head, view, len(train), loss, sched, "depth probe")
    n = len(test) if s.max_val_images <= 0 else min(len(test), s.max_val_images)
    rows = []
    for i in tqdm(range(n), desc="depth eval", unit="img", leave=False):
        image, gt = test[i]
        h, w = gt.shape
        img = resize_image(to_tensor01(image), _input_size(h, w, s.resolution, m.stride))
        with torch.inference_mode():
            pred = head(patch_features(m, img[None]))
            pred = F.interpolate(pred, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        pred_np = pred.clamp(s.min_depth, s.max_depth).cpu().numpy()
        mask = (gt > s.min_depth) & (gt < s.max_depth)
        if s.eigen_crop:
            mask &= eigen_crop_mask(h, w)
        if mask.any():
            rows.append(depth_metrics(pred_np, gt, mask))
    if not rows:
        raise ConfigError(f"{data}: no test image has valid depth in ({s.min_depth}, {s.max_depth}) m")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    result = EvalResult(
        task="depth",
        metric="rmse",
        value=mean["rmse"],
        model=m.name,
        dataset=str(data),
        settings=settings_dict(s),
        extra={
            "abs_rel": mean["abs_rel"],
            "delta1": mean["delta1"],
            "num_train": len(train),
            "num_test": len(rows),
            **timing,
            "model_info": m.describe(),
        },
    )
    if output_dir is not None:
        result.write(output_dir)
    return result


def _input_size(h: int, w: int, short: int, stride: int) -> tuple[int, int]:
    r = short / min(h, w)
    return snap(h * r, stride), snap(w * r, stride)
