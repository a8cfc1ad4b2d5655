"""Linear semantic segmentation on ADE20k (paper section 8.3), as Meta's released config sets it.

The release's `config-ade20k-linear-training.yaml` (facebookresearch/EUPE eupe/eval/segmentation):
frozen patch tokens after the final norm -> Dropout2d(0.1) -> BatchNorm -> 1x1 conv (weights
N(0, 0.01), bias 0) -> logits upsampled bilinearly to the label size -> cross-entropy averaged over
all pixels (ignored ones count as 0). AdamW lr 1e-3, betas (0.9, 0.999), wd 1e-3, no gradient
clipping, batch 16, 40k iterations under `WarmupOneCycle` (1500 warmup steps from ~0, then cosine
to 0). Training view: short side 512 x U(0.5, 2.0), 512x512 crop (cat_max_ratio 0.75), flip,
photometric distortion, padded to 512 (label 255). Evaluation: short side resized to 512, 512
windows at stride 341, averaged logits resized to the label; mIoU over the 150 classes with label 0
ignored (reduce_zero_label), averaged over the classes present in the evaluated set (union > 0).
The release validates every 5000 iterations and reports the best validation (`select=best`); its
backbone runs in train mode until the first validation (`backbone_mode=release`). The defaults,
`select=last` and `backbone_mode=eval`, and every other difference are in docs/fidelity.md.
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
from .common import EvalResult, snap
from .datasets import ADE20k
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
from .transforms import (
    maybe_flip,
    pad_bottom_right,
    random_crop,
    resize_image,
    resize_nearest,
    short_side_size,
    to_tensor01,
)

# the release's warmup, 1500 of its 40k iterations; warmup_iters=-1 keeps this share of any run
RELEASE_WARMUP_SHARE = 1500 / 40000
RELEASE_EVAL_SHARE = 5000 / 40000  # its validation interval; eval_interval=-1 keeps this share
SELECTIONS = ("last", "best")


@dataclass
class SegSettings:
    iterations: int = 40000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0  # max grad norm of the head; 0 = none (the release: 'inf')
    warmup_iters: int = -1  # -1: the release's share of the run (1500 of 40k)
    resolution: int = 512  # training crop and sliding window side
    window_stride: int = 0  # sliding-window step; 0 = int(resolution * 2/3) (341 at 512, the release)
    scale_range: tuple[float, float] = (0.5, 2.0)  # random rescale of the short side before cropping
    cat_max_ratio: float = 0.75  # redraw crops where one class covers this much (1.0 = never)
    photometric: bool = True  # mmseg's PhotoMetricDistortion on training crops
    dropout: float = 0.1  # Dropout2d on the features during training
    num_classes: int = 150
    cache_views: int = 0  # >0: train on cached features of this many fixed views per image
    cache_refresh: int = 0  # with cache_views: new augmentations every this many iterations (0 = never)
    num_workers: int = 4  # data-loading processes for the probe's training views
    max_val_images: int = 0  # 0 = all
    backbone_mode: str = "eval"  # eval: always; release: train mode until Meta's first validation
    select: str = "last"  # last: the final head; best: the best validation (the release)
    eval_interval: int = -1  # validation every N iterations (best, release); -1: 5000/40000 of the run
    train_split: str = "training"
    val_split: str = "validation"
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        check_backbone_mode(self.backbone_mode)
        if self.select not in SELECTIONS:
            raise ConfigError(f"select={self.select!r}: choose from {', '.join(SELECTIONS)}")


def release_train_steps(iterations: int, eval_interval: int) -> int:
    """The iterations Meta's seg loop runs with the backbone in train mode.

    Its first validation calls `.eval()` on the whole model and `.train()` on the head only, so the
    backbone trains until then: step `eval_interval`, or step 1 when the run is not a multiple of
    it, because the release's "one last validation" block sits inside the training loop and then
    validates after every step (eupe/eval/segmentation/train.py).
    """
    return min(iterations, eval_interval if iterations % eval_interval == 0 else 1)


class LinearSegHead(nn.Module):
    """Dropout2d -> BatchNorm -> 1x1 conv over a [B, D, h, w] feature map (dropout only in training)."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, 1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(self.dropout(feats)))


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy at the label size, averaged over all pixels, ignored ones counting 0 (the release's
    `avg_non_ignore=False`)."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none").mean()


def photometric_distortion(image01: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion with the release's ranges, on the uint8 image it would see.

    Each step with probability 0.5: brightness + U(-32, 32); contrast x U(0.5, 1.5) (first or last,
    at random); saturation x U(0.5, 1.5); hue shift U(-0.5, 0.5) turns. Values are clipped and
    truncated to uint8 after every step, as the release does.
    """
    from torchvision.transforms import functional as TF

    x = (image01 * 255).round().clamp(0, 255).to(torch.uint8)

    def affine(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
        return (x.float() * alpha + beta).clamp(0, 255).to(torch.uint8)

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return affine(x, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else x

    if rng.integers(2):
        x = affine(x, beta=rng.uniform(-32, 32))
    contrast_first = rng.integers(2) == 1
    if contrast_first:
        x = contrast(x)
    if rng.integers(2):
        x = TF.adjust_saturation(x, float(rng.uniform(0.5, 1.5)))
    if rng.integers(2):
        x = TF.adjust_hue(x, float(rng.uniform(-0.5, 0.5)))
    if not contrast_first:
        x = contrast(x)
    return x.float() / 255


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


@torch.inference_mode()
def sliding_logits(
    model: EvalModel, head: nn.Module, image01: torch.Tensor, window: int, stride: int, num_classes: int
) -> torch.Tensor:
    """Average of window logits over a [3, H, W] image: [C, H, W] (the release's `slide_inference`).

    Windows start every `stride` pixels; the last one in each direction is moved back to end at the
    border; a side shorter than `window` is covered by one window of its own length.
    """
    _, h, w = image01.shape
    ch, cw = min(window, h), min(window, w)
    rows = max(h - ch + stride - 1, 0) // stride + 1
    cols = max(w - cw + stride - 1, 0) // stride + 1
    logits = torch.zeros(num_classes, h, w, device=model.device)
    count = torch.zeros(1, h, w, device=model.device)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + ch, h), min(c * stride + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            crop = image01[:, y1:y2, x1:x2][None].to(model.device)
            out = head(patch_features(model, crop))
            out = F.interpolate(out, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0]
            logits[:, y1:y2, x1:x2] += out
            count[:, y1:y2, x1:x2] += 1
    return logits / count


def _train_view(data: ADE20k, s: SegSettings, mean: tuple[float, ...]):
    size = (s.resolution, s.resolution)

    def view(i: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = data[i]
        short = max(1, int(s.resolution * rng.uniform(*s.scale_range)))
        hw = short_side_size(*label.shape, short)
        img = resize_image(to_tensor01(image), hw)
        lab = resize_nearest(torch.from_numpy(label), hw)
        img, lab = random_crop(img, lab, size, rng, s.cat_max_ratio, ADE20k.ignore_index)
        img, lab = maybe_flip(img, lab, rng)
        if s.photometric:
            img = photometric_distortion(img, rng)
        return pad_bottom_right(img, lab, size, mean, ADE20k.ignore_index)

    return view


@register_task(
    "seg",
    settings=SegSettings,
    label="ADE20k",
    help="linear segmentation probe on ADE20k (ADEChallengeData2016 layout), mIoU",
    example="iterations=2000 batch_size=8",
)
def seg(
    model: Any,
    data: str | os.PathLike,
    weights: str | None = None,
    output_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> EvalResult:
    """Train a linear segmentation probe on ADE20k training and report validation mIoU."""
    s, m, dim = start_probe(SegSettings, model, weights, overrides)
    if s.resolution % m.stride:
        raise ConfigError(
            f"resolution={s.resolution} is not a multiple of {m.name}'s stride {m.stride}; try {snap(s.resolution, m.stride)}"
        )
    train, val = ADE20k(data, s.train_split), ADE20k(data, s.val_split)
    head = LinearSegHead(dim, s.num_classes, s.dropout)
    warmup = release_share(s.warmup_iters, s.iterations, RELEASE_WARMUP_SHARE)
    interval = max(1, release_share(s.eval_interval, s.iterations, RELEASE_EVAL_SHARE))
    # the release: warmup from lr * 1e-6, cosine to exactly 0, and its scheduler skips one step
    schedule = WarmupOneCycle(
        s.lr, s.iterations, warmup, warmup_ratio=1e-6, final_div_factor=float("inf"), step_offset=1
    )
    sched = ProbeSchedule.from_settings(s, schedule, release_train_steps(s.iterations, interval))
    n_val = len(val) if s.max_val_images <= 0 else min(len(val), s.max_val_images)
    validations: list[dict[str, Any]] = []

    def validate(step: int) -> None:
        """The release's validations (every `interval` steps and at the end) for select=best."""
        if step % interval and step != s.iterations:
            return
        head.eval()
        validations.append({"step": step, **evaluate_seg(m, head, val, n_val, s)})
        head.train()

    after_step = validate if s.select == "best" else None
    timing = train_probe(
        m, head, _train_view(train, s, m.mean), len(train), seg_loss, sched, "seg probe", after_step
    )
    if validations:  # select=best: the first of equal bests, as the release's strict '>' keeps it
        chosen = max(validations, key=lambda v: (v["mIoU"], -v["step"]))
    else:
        chosen = {"step": s.iterations, **evaluate_seg(m, head, val, n_val, s)}
    extra = {
        "backbone_mode": s.backbone_mode,
        "select": s.select,
        "selected_step": chosen["step"],
        **{k: v for k, v in chosen.items() if k not in ("mIoU", "step")},
        "validations": [{"step": v["step"], "mIoU": v["mIoU"]} for v in validations],
        "num_train": len(train),
        "num_val": n_val,
        **timing,
    }
    return finish_probe("seg", "mIoU", chosen["mIoU"], m, data, s, extra, output_dir)


def evaluate_seg(m: EvalModel, head: nn.Module, val: ADE20k, n_val: int, s: SegSettings) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU of `head` on the first `n_val` validation images."""
    stride = s.window_stride if s.window_stride > 0 else int(s.resolution * 2 / 3)
    inter = np.zeros(s.num_classes, np.int64)
    union = np.zeros(s.num_classes, np.int64)
    correct = total = 0
    for i in tqdm(range(n_val), desc="seg eval", unit="img", leave=False):
        image, label = val[i]
        h, w = label.shape
        img = resize_image(to_tensor01(image), short_side_size(h, w, s.resolution))
        logits = sliding_logits(m, head, img, s.resolution, stride, s.num_classes)
        logits = F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        pred = logits.argmax(0).cpu()
        a, b = intersect_union(pred, label, s.num_classes)
        inter += a
        union += b
        valid = label != 255
        correct += int((pred.numpy()[valid] == label[valid]).sum())
        total += int(valid.sum())
    miou, iou = mean_iou(inter, union)
    return {
        "mIoU": miou,
        "pixel_accuracy": correct / max(1, total),
        "classes_present": int((union > 0).sum()),
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
    }
