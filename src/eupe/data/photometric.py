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
from collections.abc import Callable
from functools import partial
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


def _on_device(values: list[float], device: torch.device) -> torch.Tensor:
    """`values` as float32 on `device` in one copy that does not block the host: a copy from
    pageable memory synchronizes, so the values go through pinned memory when CUDA is present
    (and the tensor is a real one: fake tensors, in a rehearsal, cannot be pinned)."""
    host = torch.tensor(values, dtype=torch.float32)
    if device.type == "cuda" and torch.cuda.is_available() and type(host) is torch.Tensor:
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _blur(x: torch.Tensor, numbers: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """`gaussian_blur` with its numbers on x's device: the sigmas, then the kernel sizes `sizes`.
    The kernels are built there, so nothing is copied."""
    size = max(sizes)
    sigma, n = numbers.view(2, -1, 1)
    t = torch.arange(size, device=x.device, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-0.5 * (t / sigma) ** 2).masked_fill(t.abs() > (n - 1) / 2, 0.0)
    total = torch.zeros_like(sigma)
    for k in set(sizes):  # summed over its own taps only, so a kernel is the same in any batch
        lo = (size - k) // 2
        total = torch.where(n == k, g[:, lo : lo + k].sum(1, keepdim=True), total)
    kernels = (g / total).to(x.dtype).view(-1, size, 1, 1, 1)
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


def _blur_numbers(x: torch.Tensor, sigmas: list[float]) -> tuple[list[float], list[int]]:
    """The numbers `_blur` needs on the device (sigmas, kernel sizes), and the sizes."""
    sizes = [blur_size(s, min(x.shape[-2:])) for s in sigmas]
    return [*sigmas, *sizes], sizes


def gaussian_blur(x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Separable Gaussian blur of [B,3,H,W] with one sigma per image and reflect padding.

    Each image's kernel has its own size (`blur_size`), zero-padded to the batch's largest, so an
    image is blurred exactly as on its own; two 1-D passes of shifted slices (a 13-tap kernel costs
    26 instead of 169 multiply-adds per pixel, and no grouped convolution is needed)."""
    numbers, sizes = _blur_numbers(x, sigmas)
    return _blur(x, _on_device(numbers, x.device), sizes)


def _solarize(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    thr = thresholds.view(-1, 1, 1, 1)
    return torch.where(x >= thr, 1.0 - x, x)


def finish_views(views: torch.Tensor, params: list[dict[str, Any]]) -> torch.Tensor:
    """Jitter (recorded order), blur, solarize a batch [B,3,S,S] (uint8, or float in [0,1]) of
    cropped views on their device; float32 [B,3,S,S] in [0,1].

    Every number the ops need (image indices, factors, sigmas, thresholds) goes to the device in
    one non-blocking copy: a copy per op would each synchronize the host with the device."""
    x = views.float().div_(255.0) if views.dtype == torch.uint8 else views.float().clone()
    host: list[float] = []  # indices too: float32 holds them exactly (< 2**24)
    steps = []  # (slice of `host` with the image indices, slice with the op's numbers, op)

    def step(
        idx: list[int], numbers: list[float], op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> None:
        start = len(host)
        host.extend([*idx, *numbers])
        steps.append((slice(start, start + len(idx)), slice(start + len(idx), len(host)), op))

    jitters = [p.get("jitter") for p in params]
    for slot in range(len(JITTER_OPS)):
        for op in JITTER_OPS:
            idx = [i for i, j in enumerate(jitters) if j and j["order"][slot] == op]
            if idx:
                step(idx, [jitters[i][op] for i in idx], partial(_jitter, op))
    idx = [i for i, p in enumerate(params) if float(p.get("blur_sigma") or 0.0) > 0]
    if idx:
        numbers, sizes = _blur_numbers(x, [float(params[i]["blur_sigma"]) for i in idx])
        step(idx, numbers, partial(_blur, sizes=sizes))
    idx = [i for i, p in enumerate(params) if p.get("solarize")]
    if idx:
        step(idx, [float(params[i].get("solarize_threshold", 0.5)) for i in idx], _solarize)
    if steps:
        on_device = _on_device(host, x.device)
        for where, numbers, op in steps:
            where = on_device[where].long()
            x[where] = op(x[where], on_device[numbers])
    return x.clamp_(0.0, 1.0)
