"""Augmented views with recorded parameters, so any view can be replayed exactly later.

`sample_params` draws everything random about one view from its own seeded generator and returns
a JSON-able dict; `apply_params` turns (image, params) into the view with deterministic tensor ops,
in two halves: `crop_view` (crop, resize, flip, in uint8: a worker's job) and `finish_views`
(photometric, batched: in the worker or on the training device). The loader and `replay_view`
share them, so a replayed view equals the produced one (bit for bit on the same device; the
teacher-feature cache relies on this).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .config import AugmentConfig
from .photometric import JITTER_OPS, finish_views


def sample_crop(
    rng: np.random.Generator, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> list[int]:
    """A random resized crop box [top, left, height, width]: area fraction in `scale`, aspect in
    `ratio` (log-uniform); after 10 misses, the largest centred box with an allowed aspect."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return [top, left, h, w]
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


def sample_params(rng: np.random.Generator, cfg: AugmentConfig, width: int, height: int) -> dict[str, Any]:
    """Every random choice of one view. The draw sequence is fixed (a disabled op still consumes its
    draws), so changing one probability does not reshuffle the other augmentations."""
    crop = sample_crop(rng, width, height, tuple(cfg.crop_scale), tuple(cfg.crop_ratio))
    flip = bool(rng.random() < cfg.flip_p)
    do_jitter = bool(rng.random() < cfg.jitter_p)
    b = float(rng.uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness))
    c = float(rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast))
    s = float(rng.uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation))
    h = float(rng.uniform(-cfg.hue, cfg.hue))
    order = [JITTER_OPS[i] for i in rng.permutation(4)]
    do_blur = bool(rng.random() < cfg.blur_p)
    sigma = float(rng.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1]))
    solarize = bool(rng.random() < cfg.solarize_p)
    return {
        "image_size": [int(width), int(height)],
        "crop": crop,
        "flip": flip,
        "jitter": {"order": order, "brightness": b, "contrast": c, "saturation": s, "hue": h}
        if do_jitter
        else None,
        "blur_sigma": sigma if do_blur else 0.0,
        "solarize": solarize,
        "solarize_threshold": float(cfg.solarize_threshold),
    }


def _uint8_chw(image: Image.Image | torch.Tensor | np.ndarray, box: list[int]) -> torch.Tensor:
    """The crop box of an image as a uint8 [3,h,w] tensor (only the box is copied out of PIL)."""
    top, left, h, w = box
    if isinstance(image, Image.Image):
        if (left, top, w, h) != (0, 0, image.width, image.height):
            image = image.crop((left, top, left + w, top + h))
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.dtype != torch.uint8:  # float in [0, 1]
        image = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return image[:, top : top + h, left : left + w]


def crop_view(
    image: Image.Image | torch.Tensor | np.ndarray, params: dict[str, Any], view_size: int
) -> torch.Tensor:
    """The geometric half of a view, in uint8: crop, resize (bilinear, antialiased) to view_size,
    flip. Cheap enough for a CPU worker; the photometric half is `finish_views`.

    `image` is a PIL image, an HWC uint8 array or a CHW tensor (uint8, or float in [0, 1])."""
    view = _uint8_chw(image, params["crop"])
    if tuple(view.shape[-2:]) != (view_size, view_size):
        view = TF.resize(
            view, [view_size, view_size], interpolation=InterpolationMode.BILINEAR, antialias=True
        )
    if params["flip"]:
        view = view.flip(-1)
    return view.contiguous()


def apply_params(
    image: Image.Image | torch.Tensor | np.ndarray, params: dict[str, Any], view_size: int
) -> torch.Tensor:
    """The view for `params`: crop+resize, flip (uint8), then jitter (recorded order), blur,
    solarize; float32 [3, view_size, view_size] in [0, 1]."""
    return finish_views(crop_view(image, params, view_size)[None], [params])[0]


def make_view(
    image: Image.Image, cfg: AugmentConfig, view_size: int, seed: list[int] | int, finish: bool = True
) -> tuple[torch.Tensor, dict[str, Any]]:
    """A fresh augmented view of `image` and its parameters, from a generator seeded by `seed`
    (e.g. [run seed, image id, view k] for the K cached views of one image). `finish=False` stops
    after the uint8 crop (the loader's workers when the device does the photometric half)."""
    params = sample_params(np.random.default_rng(seed), cfg, image.width, image.height)
    view = crop_view(image, params, view_size)
    return (finish_views(view[None], [params])[0] if finish else view), params


def replay_view(
    image: Image.Image | torch.Tensor | np.ndarray, params: dict[str, Any], view_size: int
) -> torch.Tensor:
    """Rebuild a recorded view from the decoded source image: equal to the loader's view.

    `image` is the item named by `params["source"]`/`params["key"]` decoded as the loader decodes
    it (`eupe.data.load_source_image` does that); the result is float32 [3, view_size, view_size].
    """
    if isinstance(image, Image.Image):
        have = [image.width, image.height]
    else:
        have = (
            [int(image.shape[1]), int(image.shape[0])]
            if isinstance(image, np.ndarray)
            else [int(image.shape[-1]), int(image.shape[-2])]
        )
    want = list(params["image_size"])
    if have != want:
        raise ValueError(
            f"replay_view: image is {have[0]}x{have[1]} but the view was cut from {want[0]}x{want[1]}"
        )
    return apply_params(image, params, view_size)
