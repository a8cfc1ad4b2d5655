"""Augmented views with recorded parameters, so any view can be replayed exactly later.

`sample_params` draws everything random about one view from its own seeded generator and returns
a JSON-able dict; `apply_params` turns (image, params) into the view with deterministic tensor ops.
The loader and `replay_view` share `apply_params`, so a replayed view equals the produced one bit
for bit (the teacher-feature cache relies on this).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .config import AugmentConfig

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


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


def to_tensor01(image: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
    """PIL / HWC uint8 array / CHW tensor (uint8 or float in [0,1]) -> float32 [3,H,W] in [0,1]."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    return image.float()


def _blur_kernel(sigma: float, view_size: int) -> int:
    k = 2 * math.ceil(3 * sigma) + 1
    limit = view_size - 1 if view_size % 2 == 0 else view_size  # reflect padding needs k//2 < side
    return max(3, min(k, limit))


def adjust_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of a [3,H,W] image in [0,1] by `shift` turns (same result as torchvision's
    `adjust_hue` to ~1e-6, about twice as fast: HSV -> RGB via the closed form, v*s = max - min)."""
    r, g, b = image.unbind(0)
    maxc = image.amax(0)
    delta = maxc - image.amin(0)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))  # in sixths of a turn
    hue = torch.remainder(hue + 6.0 * shift, 6.0)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + hue, 6.0)
        channels.append(maxc - delta * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(channels)


def gaussian_blur(image: torch.Tensor, sigma: float, size: int) -> torch.Tensor:
    """Separable Gaussian blur of a [3,H,W] image with reflect padding (two 1-D passes: a 13-tap
    kernel costs 26 instead of 169 multiply-adds per pixel)."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(image.dtype)
    pad = size // 2
    padded = F.pad(image.unsqueeze(0), (pad, pad, pad, pad), mode="reflect").squeeze(0)
    h, w = image.shape[-2:]
    rows = padded[:, :, 0:w] * kernel[0]
    for i in range(1, size):  # shifted slices: faster than a grouped conv on CPU for small kernels
        rows.add_(padded[:, :, i : i + w], alpha=float(kernel[i]))
    out = rows[:, 0:h] * kernel[0]
    for i in range(1, size):
        out.add_(rows[:, i : i + h], alpha=float(kernel[i]))
    return out


def apply_params(image: torch.Tensor, params: dict[str, Any], view_size: int) -> torch.Tensor:
    """The view for `params`: crop+resize, flip, jitter (recorded order), blur, solarize."""
    top, left, h, w = params["crop"]
    if (top, left, h, w) == (0, 0, view_size, view_size) == (0, 0, *image.shape[-2:]):
        view = image.clone()  # the whole image at its own size (a `views` source kept whole)
    else:
        view = TF.resized_crop(
            image,
            top,
            left,
            h,
            w,
            [view_size, view_size],
            interpolation=InterpolationMode.BILINEAR,
            antialias=True,
        )
    view = view.clamp_(0.0, 1.0)
    if params["flip"]:
        view = view.flip(-1)
    jitter = params.get("jitter")
    if jitter:
        for op in jitter["order"]:
            if op == "brightness":
                view = TF.adjust_brightness(view, jitter["brightness"])
            elif op == "contrast":
                view = TF.adjust_contrast(view, jitter["contrast"])
            elif op == "saturation":
                view = TF.adjust_saturation(view, jitter["saturation"])
            else:
                view = adjust_hue(view, jitter["hue"])
    sigma = float(params.get("blur_sigma") or 0.0)
    if sigma > 0:
        view = gaussian_blur(view, sigma, _blur_kernel(sigma, view_size))
    if params.get("solarize"):
        thr = float(params.get("solarize_threshold", 0.5))
        view = torch.where(view >= thr, 1.0 - view, view)
    return view.clamp_(0.0, 1.0).contiguous()


def make_view(
    image: Image.Image, cfg: AugmentConfig, view_size: int, seed: list[int] | int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """A fresh augmented view of `image` and its parameters, from a generator seeded by `seed`
    (e.g. [run seed, image id, view k] for the K cached views of one image)."""
    params = sample_params(np.random.default_rng(seed), cfg, image.width, image.height)
    return apply_params(to_tensor01(image), params, view_size), params


def replay_view(
    image: Image.Image | torch.Tensor | np.ndarray, params: dict[str, Any], view_size: int
) -> torch.Tensor:
    """Rebuild a recorded view from the decoded source image: equal to the loader's view.

    `image` is the item named by `params["source"]`/`params["key"]` decoded as the loader decodes
    it (`eupe.data.load_source_image` does that); the result is float32 [3, view_size, view_size].
    """
    tensor = to_tensor01(image)
    want = list(params["image_size"])
    have = [int(tensor.shape[-1]), int(tensor.shape[-2])]
    if have != want:
        raise ValueError(
            f"replay_view: image is {have[0]}x{have[1]} but the view was cut from {want[0]}x{want[1]}"
        )
    return apply_params(tensor, params, view_size)
