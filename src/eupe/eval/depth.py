"""Linear monocular depth on NYUv2 (paper section 8.4), as Meta's released config sets it.

The release's `config-nyu.yaml` (facebookresearch/EUPE eupe/eval/depth): frozen patch tokens after
the final norm -> BatchNorm -> 1x1 conv (N(0, 0.01), bias 0) to 256 bin logits; depth is the
expectation over bins spaced uniformly in [0.001, 10] m with "linear" weights (ReLU + 0.1,
normalized). Loss: SigLoss sqrt(Var(g) + 0.15 Mean(g)^2), g = log(pred + 1e-3) - log(gt + 1e-3),
over pixels with depth, the variance term left out for the first 100 steps. AdamW lr 3e-4, betas
(0.9, 0.99), wd 1e-3, gradient norm clipped at 35, batch 16, 38.4k iterations under
`WarmupOneCycle` (a third of the run warming up with beta1 = 0, then cosine, beta1 0.85 -> 0.95).
Training view at native size: NYU border crop, rotation U(-2.5, 2.5) deg (p 0.5), flip, random
416x544 crop, colour jitter (p 0.5: gamma, brightness U(0.75, 1.25), per-channel colour). Test: the
full 480x640 image and its mirror (flip TTA, predictions averaged), metrics per image on the Eigen
crop over pixels with depth in (0.001, 10) m, then averaged: RMSE (metres), abs_rel, delta<1.25.
The release's backbone stays in train mode for the whole run (`backbone_mode=release`): its first
validation, the only thing that would switch it to eval, comes at step 100000. The default
`backbone_mode=eval` and every other difference are in docs/fidelity.md.
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
from .common import EvalResult
from .datasets import NYUDepth
from .features import (
    ProbeSchedule,
    WarmupOneCycle,
    check_backbone_mode,
    finish_probe,
    patch_features,
    release_share,
    start_probe,
    train_probe,
)
from .models import EvalModel
from .registry import register_task
from .transforms import maybe_flip, random_crop, resize_image, resize_nearest, short_side_size, to_tensor01

EIGEN_CROP_480x640 = (45, 471, 41, 601)  # top, bottom, left, right: the test-time evaluation crop
NYU_CROP_480x640 = (45, 472, 43, 608)  # top, bottom, left, right: the release's training border crop
RELEASE_WARMUP_SHARE = 12800 / 38400  # warmup_iters=-1 keeps this share of any run
RELEASE_EVAL_INTERVAL = 100000  # config-nyu.yaml's eval_interval: the backbone trains until then


@dataclass
class DepthSettings:
    iterations: int = 38400
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)  # beta1 is then set by the schedule (0, then 0.85 -> 0.95)
    grad_clip: float = 35.0  # max grad norm of the head; 0 = none
    warmup_iters: int = -1  # -1: the release's share of the run (12800 of 38400)
    resolution: int = 0  # 0: images at their own size (480x640, the release); N: short side resized to N
    crop: tuple[int, int] = (416, 544)  # random training crop (H, W) in pixels, after the NYU border crop
    rotation: float = 2.5  # max degrees of the random rotation (applied with probability 0.5; 0 = off)
    color_aug_prob: float = 0.5  # probability of the gamma/brightness/colour jitter (0 = off)
    brightness_range: tuple[float, float] = (0.75, 1.25)
    sigloss_warmup: int = 100  # first steps whose SigLoss leaves out the variance term
    flip_tta: bool = True  # average the test prediction with that of the mirrored image
    num_bins: int = 256
    min_depth: float = 1e-3
    max_depth: float = 10.0
    eigen_crop: bool = True
    cache_views: int = 0
    cache_refresh: int = 0  # with cache_views: new augmentations every this many iterations (0 = never)
    num_workers: int = 4  # data-loading processes for the probe's training views
    max_val_images: int = 0
    backbone_mode: str = "eval"  # eval: always; release: train mode for the run, as the release
    train_list: str = "nyu_train.txt"
    test_list: str = "nyu_test.txt"
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        check_backbone_mode(self.backbone_mode)


class LinearDepthHead(nn.Module):
    """BatchNorm -> 1x1 conv to bin logits -> expected depth over uniform bins: [B, 1, h, w]."""

    def __init__(self, dim: int, num_bins: int = 256, min_depth: float = 1e-3, max_depth: float = 10.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_bins, 1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("centers", torch.linspace(min_depth, max_depth, num_bins), persistent=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        w = torch.relu(self.conv(self.bn(feats))) + 0.1
        w = w / w.sum(1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", w, self.centers)[:, None]


def sig_loss(
    pred: torch.Tensor, gt: torch.Tensor, with_variance: bool = True, eps: float = 1e-3
) -> torch.Tensor:
    """The release's SigLoss: sqrt(Var(g) + 0.15 Mean(g)^2), g = log(pred + eps) - log(gt + eps).

    Over pixels with depth (gt != 0; padding and rotation corners are 0), unbiased variance;
    `with_variance=False` is its warm-up form sqrt(0.15 Mean(g)^2).
    """
    pred = F.interpolate(pred, size=gt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    valid = gt != 0
    if not valid.any():
        return pred.sum() * 0.0
    g = torch.log(pred[valid] + eps) - torch.log(gt[valid] + eps)
    dg = 0.15 * g.mean() ** 2
    if with_variance and g.numel() > 1:
        dg = dg + g.var()
    # the release returns |Dg| where Dg <= 0; sqrt's gradient at 0 is infinite
    return torch.where(dg > 0, torch.sqrt(dg.clamp_min(1e-12)), dg.abs())


def _scaled_box(box: tuple[int, int, int, int], h: int, w: int) -> tuple[int, int, int, int]:
    """A (top, bottom, left, right) box given on 480x640, scaled to HxW with int() as the release."""
    top, bottom, left, right = box
    return int(top / 480 * h), int(bottom / 480 * h), int(left / 640 * w), int(right / 640 * w)


def eigen_crop_mask(h: int, w: int) -> np.ndarray:
    """The Eigen evaluation crop for an HxW image, scaled proportionally from 480x640."""
    top, bottom, left, right = _scaled_box(EIGEN_CROP_480x640, h, w)
    mask = np.zeros((h, w), bool)
    mask[top:bottom, left:right] = True
    return mask


def color_jitter(
    image01: torch.Tensor, rng: np.random.Generator, brightness: tuple[float, float]
) -> torch.Tensor:
    """The release's depth ColorAug on 0..255 values: x^U(0.9, 1.1) (gamma on the 0..255 scale, as
    the toolbox it comes from does), x U(brightness), x U(0.9, 1.1) per channel, clipped."""
    x = (image01 * 255) ** float(rng.uniform(0.9, 1.1)) * float(rng.uniform(*brightness))
    x = x * torch.tensor(rng.uniform(0.9, 1.1, size=3), dtype=x.dtype).view(3, 1, 1)
    return x.clamp(0, 255) / 255


def rotate_pair(
    image01: torch.Tensor, depth: torch.Tensor, degrees: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate about the centre: bilinear for the image, nearest for depth; corners become 0 (no depth)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image01 = TF.rotate(image01, degrees, interpolation=InterpolationMode.BILINEAR)
    depth = TF.rotate(depth[None], degrees, interpolation=InterpolationMode.NEAREST)[0]
    return image01, depth


def depth_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """RMSE (metres), abs_rel and delta<1.25 over `mask` pixels of one image."""
    p, g = pred[mask].astype(np.float64), gt[mask].astype(np.float64)
    ratio = np.maximum(p / g, g / p)
    return {
        "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
        "abs_rel": float(np.mean(np.abs(p - g) / g)),
        "delta1": float(np.mean(ratio < 1.25)),
    }


@register_task(
    "depth",
    settings=DepthSettings,
    label="NYUv2",
    help="linear depth probe on NYUv2 (BTS lists nyu_train.txt/nyu_test.txt), RMSE in metres",
    example="iterations=2000",
)
def depth(
    model: Any,
    data: str | os.PathLike,
    weights: str | None = None,
    output_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> EvalResult:
    """Train a linear depth probe on the NYU train list; RMSE on the test list (Eigen crop)."""
    s, m, dim = start_probe(DepthSettings, model, weights, overrides)
    train, test = NYUDepth(data, s.train_list), NYUDepth(data, s.test_list)
    head = LinearDepthHead(dim, s.num_bins, s.min_depth, s.max_depth)

    def view(i: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        image, gt = train[i]
        img, d = _resized(to_tensor01(image), torch.from_numpy(gt), s.resolution)
        top, bottom, left, right = _scaled_box(NYU_CROP_480x640, *d.shape)
        img, d = img[:, top:bottom, left:right], d[top:bottom, left:right]
        if s.rotation > 0 and rng.random() < 0.5:
            img, d = rotate_pair(img, d, float(rng.uniform(-s.rotation, s.rotation)))
        img, d = maybe_flip(img, d, rng)
        img, d = random_crop(img, d, tuple(s.crop), rng)
        if rng.random() < s.color_aug_prob:
            img = color_jitter(img, rng, s.brightness_range)
        return img.contiguous(), d.contiguous()

    steps = 0

    def loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        nonlocal steps
        steps += 1
        return sig_loss(pred, gt, with_variance=steps > s.sigloss_warmup)

    warmup = release_share(s.warmup_iters, s.iterations, RELEASE_WARMUP_SHARE)
    schedule = WarmupOneCycle(s.lr, s.iterations, warmup, momentum=(0.85, 0.95))
    sched = ProbeSchedule.from_settings(s, schedule, min(s.iterations, RELEASE_EVAL_INTERVAL))
    timing = train_probe(m, head, view, len(train), loss, sched, "depth probe")
    n = len(test) if s.max_val_images <= 0 else min(len(test), s.max_val_images)
    rows = []
    for i in tqdm(range(n), desc="depth eval", unit="img", leave=False):
        image, gt = test[i]
        h, w = gt.shape
        img, _ = _resized(to_tensor01(image), None, s.resolution)
        pred = predict_depth(m, head, img, s.flip_tta)
        pred = F.interpolate(pred[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        pred_np = pred.clamp(s.min_depth, s.max_depth).cpu().numpy()
        mask = (gt > s.min_depth) & (gt < s.max_depth)
        if s.eigen_crop:
            mask &= eigen_crop_mask(h, w)
        if mask.any():
            rows.append(depth_metrics(pred_np, gt, mask))
    if not rows:
        raise ConfigError(f"{data}: no test image has valid depth in ({s.min_depth}, {s.max_depth}) m")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    extra = {
        "abs_rel": mean["abs_rel"],
        "delta1": mean["delta1"],
        "backbone_mode": s.backbone_mode,
        "num_train": len(train),
        "num_test": len(rows),
        **timing,
    }
    return finish_probe("depth", "rmse", mean["rmse"], m, data, s, extra, output_dir)


@torch.inference_mode()
def predict_depth(model: EvalModel, head: nn.Module, image01: torch.Tensor, flip_tta: bool) -> torch.Tensor:
    """[1, h, w] depth at feature resolution; with flip_tta, averaged with the mirrored image's."""
    images = torch.stack([image01, image01.flip(-1)]) if flip_tta else image01[None]
    pred = head(patch_features(model, images))
    return (pred[0] + pred[1].flip(-1)) / 2 if flip_tta else pred[0]


def _resized(
    image01: torch.Tensor, depth: torch.Tensor | None, short: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With short > 0, both resized to that short side (depth: nearest); else unchanged."""
    if short <= 0:
        return image01, depth
    size = short_side_size(*image01.shape[-2:], short)
    return resize_image(image01, size), (None if depth is None else resize_nearest(depth, size))
