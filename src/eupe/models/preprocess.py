"""The encoders' input: [0,1] views resized (bicubic, antialiased) and ImageNet-normalized.

The paper uses the standard ImageNet constants for every student and for the proxy (4.1).
`Normalize` keeps them as buffers, so on a GPU they live on the device once instead of being
copied from the host on every batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize(views: torch.Tensor, side: int) -> torch.Tensor:
    """[B,3,H,W] views in [0,1] -> side x side, bicubic with antialiasing, clamped back to [0,1]."""
    if views.shape[-2:] == (side, side):
        return views
    return F.interpolate(
        views, size=(side, side), mode="bicubic", align_corners=False, antialias=True
    ).clamp_(0, 1)


class Normalize(nn.Module):
    """(x - mean) / std per channel, the constants held as (non-persistent) buffers."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return (views - self.mean) / self.std
