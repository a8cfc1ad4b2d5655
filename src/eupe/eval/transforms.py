"""The image operations of the dense probes and the PCA/keypoint views: crops, flips, padding and
resizing of an image tensor together with its label or depth map, following the released EUPE
evaluation transforms (mmseg's rules where the release uses them)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def random_crop(
    image: torch.Tensor,
    target: torch.Tensor,
    size: tuple[int, int],
    rng: np.random.Generator,
    cat_max_ratio: float = 1.0,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniformly placed crop of at most `size` (smaller where the input is smaller).

    cat_max_ratio < 1 (segmentation): redraw the box up to 10 times until no single class covers
    `cat_max_ratio` or more of the crop's labelled pixels (mmseg's / the release's rule).
    """
    h, w = target.shape[-2:]
    ch, cw = size

    def box() -> tuple[int, int]:
        return int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))

    y, x = box()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            values, counts = torch.unique(target[..., y : y + ch, x : x + cw], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = box()
    return image[..., y : y + ch, x : x + cw], target[..., y : y + ch, x : x + cw]


def maybe_flip(
    image: torch.Tensor, target: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal flip of both with probability 0.5."""
    if rng.random() < 0.5:
        return image.flip(-1), target.flip(-1)
    return image, target


def pad_bottom_right(
    image: torch.Tensor,
    target: torch.Tensor,
    size: tuple[int, int],
    image_fill: tuple[float, ...],
    target_fill: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad up to `size` at the bottom and right; `image_fill` per channel (the model's mean pads to 0
    after normalization, as the release pads the normalized crop with 0)."""
    (c, h, w), (out_h, out_w) = image.shape, (max(size[0], image.shape[-2]), max(size[1], image.shape[-1]))
    if (out_h, out_w) != (h, w):
        fill = torch.tensor(image_fill, dtype=image.dtype).view(-1, 1, 1)
        padded = fill.expand(c, out_h, out_w).clone()
        padded[:, :h, :w] = image
        image = padded
        target = F.pad(target, (0, out_w - w, 0, out_h - h), value=target_fill)
    return image.contiguous(), target.contiguous()


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(H, W) with the shorter side `short`, the other int(x + 0.5) of the scaled one (the release's)."""
    if h > w:
        return int(short * h / w + 0.5), short
    return short, int(short * w / h + 0.5)


def to_tensor01(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> [3,H,W] float in [0,1]."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div_(255)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = torch.nn.functional.interpolate(
        image[None], size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return out[0].clamp_(0, 1)


def resize_nearest(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return torch.nn.functional.interpolate(target[None, None].float(), size=size, mode="nearest")[0, 0].to(
        target.dtype
    )
