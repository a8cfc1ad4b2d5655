"""The photometric half of a view, batched: colour jitter, Gaussian blur, solarization.

`finish_views(views, params)` takes a batch of cropped views (uint8 or float, any device) and the
recorded parameters of each, and returns float32 views in [0, 1]. Each view gets its own factors,
jitter order, blur sigma and solarization, so the batch is processed op by op on the subset of
views that use it. The same function finishes one view in a CPU worker (a batch of one) and a whole
batch on the training GPU (`data.device_augment`); the two agree to float rounding (tested).
The single-view ops equal torchvision's `adjust_*` and `gaussian_blur` to ~1e-6 (tested).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of [B,3,H,W] -> [B,1,H,W] (torchvision's rgb_to_grayscale weights)."""
    r, g, b = x.unbind(-3)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * x + (1 - ratio) * other, clamped; overwrites x (always a subset copy here)."""
    return x.mul_(ratio).add_(other * (1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of [B,3,H,W] images in [0,1] by `shift` [B] turns (the closed-form HSV round
    trip: v*s = max - min, so no division by v)."""
    r, g, b = x.unbind(-3)
    maxc = x.amax(-3)
    delta = maxc - x.amin(-3)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))  # in sixths of a turn
    hue = torch.remainder(hue + 6.0 * shift.view(-1, 1, 1), 6.0)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + hue, 6.0)
        channels.append(maxc - delta * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(channels, -3)


def _jitter(op: str, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if op == "hue":
        return adjust_hue(x, f)
    f = f.view(-1, 1, 1, 1)
    if op == "brightness":
        return x.mul_(f).clamp_(0.0, 1.0)
    if op == "contrast":
        return _blend(x, _gray(x).mean((-3, -2, -1), keepdim=True), f)
    return _blend(x, _gray(x), f)  # saturation


def blur_size(sigma: float, view_size: int) -> int:
    """Odd kernel size covering +-3 sigma, small enough for reflect padding of a view_size side."""
    k = 2 * math.ceil(3 * sigma) + 1
    limit = view_size - 1 if view_size % 2 == 0 else view_size  # reflect padding needs k//2 < side
    return max(3, min(k, limit))


def gaussian_blur(x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Separable Gaussian blur of [B,3,H,W] with one sigma per image and reflect padding.

    Each image's kernel has its own size (`blur_size`), zero-padded to the batch's largest, so an
    image is blurred exactly as on its own; two 1-D passes of shifted slices (a 13-tap kernel costs
    26 instead of 169 multiply-adds per pixel, and no grouped convolution is needed)."""
    side = min(x.shape[-2:])
    sizes = [blur_size(s, side) for s in sigmas]
    size = max(sizes)
    kernels = torch.zeros(len(sigmas), size)
    for i, (sigma, n) in enumerate(zip(sigmas, sizes)):
        t = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        g = torch.exp(-0.5 * (t / sigma) ** 2)
        kernels[i, (size - n) // 2 : (size - n) // 2 + n] = g / g.sum()
    kernels = kernels.to(device=x.device, dtype=x.dtype).view(len(sigmas), size, 1, 1, 1)
    pad = size // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    h, w = x.shape[-2:]
    rows = padded[..., 0:w] * kernels[:, 0]
    for i in range(1, size):  # in place: no temporary per tap
        rows.addcmul_(padded[..., i : i + w], kernels[:, i])
    out = rows[..., 0:h, :] * kernels[:, 0]
    for i in range(1, size):
        out.addcmul_(rows[..., i : i + h, :], kernels[:, i])
    return out


def finish_views(views: torch.Tensor, params: list[dict[str, Any]]) -> torch.Tensor:
    """Jitter (recorded order), blur, solarize a batch [B,3,S,S] (uint8, or float in [0,1]) of
    cropped views on their device; float32 [B,3,S,S] in [0,1]."""
    x = views.float().div_(255.0) if views.dtype == torch.uint8 else views.float().clone()
    dev = x.device

    def tensor(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).to(dev, non_blocking=True)

    jitters = [p.get("jitter") for p in params]
    for slot in range(len(JITTER_OPS)):
        for op in JITTER_OPS:
            idx = [i for i, j in enumerate(jitters) if j and j["order"][slot] == op]
            if idx:
                where = torch.tensor(idx, device=dev)
                x[where] = _jitter(op, x[where], tensor([params[i]["jitter"][op] for i in idx]))
    idx = [i for i, p in enumerate(params) if float(p.get("blur_sigma") or 0.0) > 0]
    if idx:
        where = torch.tensor(idx, device=dev)
        x[where] = gaussian_blur(x[where], [float(params[i]["blur_sigma"]) for i in idx])
    idx = [i for i, p in enumerate(params) if p.get("solarize")]
    if idx:
        where = torch.tensor(idx, device=dev)
        thr = tensor([float(params[i].get("solarize_threshold", 0.5)) for i in idx]).view(-1, 1, 1, 1)
        part = x[where]
        x[where] = torch.where(part >= thr, 1.0 - part, part)
    return x.clamp_(0.0, 1.0)
