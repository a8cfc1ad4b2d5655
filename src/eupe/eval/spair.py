"""Training-free semantic keypoint correspondence on SPair-71k (paper section 8.5).

Both images are resized so the long side is 512 (patch 16) or 448 (patch 14); for other strides
the long side is the nearest multiple of the stride to 512 (ConvNeXt: 512). The short side keeps
the aspect ratio, snapped to the stride. Patch feature maps are upsampled bilinearly to the
resized image; each source keypoint's feature is read at its rounded pixel, and the prediction is
the target pixel of highest cosine similarity, mapped back to original coordinates. A keypoint is
correct within 0.1 x the larger side of the target bounding box (PCK@0.1).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .common import EvalResult, resolve_settings, settings_dict, snap
from .datasets import SPair, load_rgb
from .features import patch_features
from .models import EvalModel, load_model
from .registry import register_task
from .transforms import resize_image, to_tensor01


@dataclass
class SPairSettings:
    resolution: int = 0  # long side; 0 = 448 for stride 14, else the multiple of the stride nearest 512
    alpha: float = 0.1
    pairs_per_category: int = 100
    split: str = "test"
    device: str = "auto"


def long_side_for(stride: int) -> int:
    return 448 if stride == 14 else snap(512, stride)


def pck(pred: np.ndarray, gt: np.ndarray, bbox: np.ndarray, alpha: float = 0.1) -> np.ndarray:
    """Per-keypoint correctness: ||pred - gt|| <= alpha * max(bbox w, bbox h)."""
    threshold = alpha * max(bbox[2] - bbox[0], bbox[3] - bbox[1])
    return np.linalg.norm(pred - gt, axis=1) <= threshold


def _dense_features(m: EvalModel, path: Any, long_side: int) -> tuple[torch.Tensor, float, float]:
    """Unit-norm features upsampled to the resized image [D, H, W], and the x/y scale factors."""
    image = to_tensor01(np.asarray(load_rgb(path)))
    h, w = image.shape[-2:]
    r = long_side / max(h, w)
    size = (snap(h * r, m.stride), snap(w * r, m.stride))
    fmap = patch_features(m, resize_image(image, size)[None])
    fmap = F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)[0]
    return F.normalize(fmap, dim=0), size[1] / w, size[0] / h


@torch.inference_mode()
def match_keypoints(src: torch.Tensor, trg: torch.Tensor, src_xy: np.ndarray) -> np.ndarray:
    """For each (x, y) in `src_xy` (resized source pixels), the argmax-cosine (x, y) in `trg`."""
    _, hs, ws = src.shape
    _, ht, wt = trg.shape
    xs = np.clip(np.round(src_xy[:, 0]).astype(int), 0, ws - 1)
    ys = np.clip(np.round(src_xy[:, 1]).astype(int), 0, hs - 1)
    q = src[:, ys, xs].T  # [K, D]
    best = (q @ trg.flatten(1)).argmax(1).cpu().numpy()
    return np.stack([best % wt, best // wt], 1).astype(np.float64)


@register_task(
    "spair",
    settings=SPairSettings,
    label="SPair",
    help="training-free keypoint correspondence on SPair-71k, PCK@0.1",
    example="pairs_per_category=20",
)
def spair(
    model: Any,
    data: str | os.PathLike,
    weights: str | None = None,
    output_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> EvalResult:
    """PCK@alpha over SPair-71k test pairs (first `pairs_per_category` per category)."""
    s = resolve_settings(SPairSettings, overrides)
    m = load_model(model, weights, s.device)
    long_side = s.resolution or long_side_for(m.stride)
    pairs = SPair(data, s.split, s.pairs_per_category if s.pairs_per_category > 0 else None)
    hits: dict[str, list[bool]] = defaultdict(list)
    per_image: list[float] = []
    for p in tqdm(pairs.pairs, desc="spair pairs", unit="pair", leave=False):
        src, sx, sy = _dense_features(m, p.src, long_side)
        trg, tx, ty = _dense_features(m, p.trg, long_side)
        pred = match_keypoints(src, trg, p.src_kps * [sx, sy]) / [tx, ty]
        ok = pck(pred, p.trg_kps, p.trg_bbox, s.alpha)
        hits[p.category].extend(ok.tolist())
        if len(ok):
            per_image.append(float(ok.mean()))
    all_hits = [h for v in hits.values() for h in v]
    per_cat = {c: float(np.mean(v)) for c, v in sorted(hits.items()) if v}
    result = EvalResult(
        task="spair",
        metric=f"pck@{s.alpha:g}",
        value=float(np.mean(all_hits)) if all_hits else None,
        model=m.name,
        dataset=str(data),
        settings={**settings_dict(s), "long_side": long_side},
        extra={
            "pck_per_category": per_cat,
            "pck_mean_over_categories": float(np.mean(list(per_cat.values()))) if per_cat else None,
            "pck_mean_over_pairs": float(np.mean(per_image)) if per_image else None,
            "num_pairs": len(pairs),
            "num_keypoints": len(all_hits),
            "model_info": m.describe(),
        },
    )
    if output_dir is not None:
        result.write(output_dir)
    return result
