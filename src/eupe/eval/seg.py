"""Linear semantic segmentation on ADE20k (paper section 8.3).

Frozen patch tokens after the final norm -> BatchNorm -> 1x1 conv (linear) classifier, logits
upsampled bilinearly to the label size. AdamW lr 1e-3, wd 1e-3, batch 16, 512 px crops, 40k
iterations. Evaluation: short side resized to `resolution`, sliding `resolution` windows with
stride 2/3 of a window, logits resized to the original label; mIoU over the 150 classes with label
0 ignored (reduce_zero_label), averaged over the classes present in the evaluated set (union > 0),
as mmseg does.
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
from .datasets import ADE20k
from .features import (
    ProbeSchedule,
    patch_features,
    random_crop_flip,
    resize_image,
    resize_nearest,
    to_tensor01,
    train_probe,
)
from .models import EvalModel, load_model


@dataclass
class SegSettings:
    iterations: int = 40000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-3
    warmup_iters: int = 0
    resolution: int = 512  # training crop and sliding window side
    scale_range: tuple[float, float] = (0.5, 2.0)  # random rescale of the short side before cropping
    num_classes: int = 150
    cache_views: int = 0  # >0: train on cached features of this many fixed views per image
    cache_refresh: int = 0  # with cache_views: new augmentations every this many iterations (0 = never)
    num_workers: int = 4  # data-loading processes for the probe's training views
    max_val_images: int = 0  # 0 = all
    train_split: str = "training"
    val_split: str = "validation"
    seed: int = 0
    device: str = "auto"


class LinearSegHead(nn.Module):
    """BatchNorm -> 1x1 conv over a [B, D, h, w] feature map."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(feats))


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index)


def intersect_union(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class intersection and union pixel counts of one prediction (ignored pixels skipped)."""
    pred = torch.as_tensor(pred).flatten().long()
    label = torch.as_tensor(label).flatten().long()
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    inter = torch.bincount(label[pred == label], minlength=num_classes)[:num_classes]
    area_p = torch.bincount(pred.clamp(0, num_classes - 1), minlength=num_classes)[:num_classes]
    area_l = torch.bincount(label, minlength=num_classes)[:num_classes]
    return inter.numpy().astype(np.int64), (area_p + area_l - inter).numpy().astype(np.int64)


def mean_iou(intersection: np.ndarray, union: np.ndarray) -> tuple[float, np.ndarray]:
    """(mIoU over classes with union > 0, per-class IoU with NaN for absent classes)."""
    iou = np.full(len(union), np.nan)
    present = union > 0
    iou[present] = intersection[present] / union[present]
    return (float(np.nanmean(iou)) if present.any() else float("nan")), iou


def short_side_size(h: int, w: int, short: int, stride: int) -> tuple[int, int]:
    r = short / min(h, w)
    return snap(h * r, stride), snap(w * r, stride)


@torch.inference_mode()
def sliding_logits(
    model: EvalModel, head: nn.Module, image01: torch.Tensor, window: int, num_classes: int
) -> torch.Tensor:
    """Average of window logits over a [3, H, W] image (H, W >= window): [C, H, W]."""
    _, h, w = image01.shape
    step = max(model.stride, snap(window * 2 / 3, model.stride))
    ys = sorted({min(y, h - window) for y in range(0, max(h - window, 0) + step, step)})
    xs = sorted({min(x, w - window) for x in range(0, max(w - window, 0) + step, step)})
    logits = torch.zeros(num_classes, h, w, device=model.device)
    count = torch.zeros(1, h, w, device=model.device)
    crops = [(y, x) for y in ys for x in xs]
    for y, x in crops:
        crop = image01[:, y : y + window, x : x + window][None].to(model.device)
        out = head(patch_features(model, crop))
        out = F.interpolate(out, size=(window, window), mode="bilinear", align_corners=False)[0]
        logits[:, y : y + window, x : x + window] += out
        count[:, y : y + window, x : x + window] += 1
    return logits / count


def _train_view(data: ADE20k, s: SegSettings, stride: int):
    def view(i: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = data[i]
        h, w = label.shape
        short = s.resolution * rng.uniform(*s.scale_range)
        r = short / min(h, w)
        size = (max(1, round(h * r)), max(1, round(w * r)))
        img = resize_image(to_tensor01(image), size)
        lab = resize_nearest(torch.from_numpy(label), size)
        return random_crop_flip(img, lab, (s.resolution, s.resolution), 255, rng)

    return view


def seg(
    model: Any,
    data: str | os.PathLike,
    weights: str | None = None,
    output_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> EvalResult:
    """Train a linear segmentation probe on ADE20k training and report validation mIoU."""
    s = resolve_settings(SegSettings, overrides)
    m = load_model(model, weights, s.device)
    if s.resolution % m.stride:
        raise ConfigError(
            f"resolution={s.resolution} is not a multiple of {m.name}'s stride {m.stride}; try {snap(s.resolution, m.stride)}"
        )
    seed_everything(s.seed)
    train, val = ADE20k(data, s.train_split), ADE20k(data, s.val_split)
    dim = patch_features(m, torch.zeros(1, 3, m.stride, m.stride)).shape[1]
    head = LinearSegHead(dim, s.num_classes)
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
    timing = train_probe(m, head, _train_view(train, s, m.stride), len(train), seg_loss, sched, "seg probe")
    n_val = len(val) if s.max_val_images <= 0 else min(len(val), s.max_val_images)
    inter = np.zeros(s.num_classes, np.int64)
    union = np.zeros(s.num_classes, np.int64)
    correct = total = 0
    for i in tqdm(range(n_val), desc="seg eval", unit="img", leave=False):
        image, label = val[i]
        h, w = label.shape
        img = resize_image(to_tensor01(image), short_side_size(h, w, s.resolution, m.stride))
        logits = sliding_logits(m, head, img, s.resolution, s.num_classes)
        logits = F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        pred = logits.argmax(0).cpu()
        a, b = intersect_union(pred, label, s.num_classes)
        inter += a
        union += b
        valid = label != 255
        correct += int((pred.numpy()[valid] == label[valid]).sum())
        total += int(valid.sum())
    miou, iou = mean_iou(inter, union)
    result = EvalResult(
        task="seg",
        metric="mIoU",
        value=miou,
        model=m.name,
        dataset=str(data),
        settings=settings_dict(s),
        extra={
            "pixel_accuracy": correct / max(1, total),
            "classes_present": int((union > 0).sum()),
            "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
            "num_train": len(train),
            "num_val": n_val,
            **timing,
            "model_info": m.describe(),
        },
    )
    if output_dir is not None:
        result.write(output_dir)
    return result
