"""The teacher interface: a frozen expert that takes views at its own resolution and normalization.

A backend registers a factory with `@register_teacher("name")`; `build_teacher(backend, **spec)`
builds it. Every teacher returns `EncoderOutput(cls, patches, registers=None, grid)`, runs in eval
mode under `torch.inference_mode()`, and holds no trainable parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.encoder import EncoderOutput

TEACHER_BACKENDS: dict[str, Callable[..., Teacher]] = {}


def register_teacher(name: str) -> Callable[[Callable[..., Teacher]], Callable[..., Teacher]]:
    """Register a teacher factory under a backend name (one file per backend is enough)."""

    def wrap(factory: Callable[..., Teacher]) -> Callable[..., Teacher]:
        if name in TEACHER_BACKENDS:
            raise ValueError(f"teacher backend '{name}' is already registered")
        TEACHER_BACKENDS[name] = factory
        return factory

    return wrap


def build_teacher(backend: str, **spec: Any) -> Teacher:
    if backend not in TEACHER_BACKENDS:
        raise ConfigError(
            f"unknown teacher backend '{backend}'; known: {', '.join(sorted(TEACHER_BACKENDS))}"
        )
    return TEACHER_BACKENDS[backend](**spec)


def rng_devices() -> list[int]:
    """Devices whose RNG a seeded teacher init must leave untouched (the run's own streams)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def weights_to_bf16(module: nn.Module) -> nn.Module:
    """Store a frozen module's parameters in bf16 (half the memory of fp32), for `dtype: bf16`
    teachers that run under bf16 autocast anyway. Buffers (RoPE tables, masks) stay fp32, so
    positions keep full precision on large grids."""
    for p in module.parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    return module


class Teacher(nn.Module):
    """Base class. Subclasses implement `encode(images)` on resized, normalized images.

    Attributes every teacher sets: `resolution` (native square input side), `stride` (patch size),
    `mean`/`std` (input normalization), `cls_dim` and `patch_dim` (output widths, known before the
    first forward so adapter heads can be built).
    """

    resolution: int
    stride: int
    cls_dim: int
    patch_dim: int

    def __init__(
        self,
        resolution: int,
        stride: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.training = False  # frozen experts are always in eval mode (see `train`)
        if resolution % stride:
            raise ConfigError(
                f"teacher expects inputs that are multiples of its patch size {stride}; "
                f"got resolution={resolution} (nearest: {round(resolution / stride) * stride})"
            )
        self.resolution, self.stride = resolution, stride
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.autocast_dtype = autocast_dtype

    def prepare(self, views: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
        """[B,3,H,W] views in [0,1] -> resized to this teacher's input and normalized."""
        size = resolution or self.resolution
        if views.shape[-2:] != (size, size):
            views = F.interpolate(
                views, size=(size, size), mode="bicubic", align_corners=False, antialias=True
            ).clamp_(0, 1)
        return (views - self.mean) / self.std

    def encode(self, images: torch.Tensor) -> EncoderOutput:
        raise NotImplementedError

    def compile_encode(self) -> None:
        """`torch.compile` the network forward (`train.compile`): the frozen teachers are most of a
        distillation step's FLOPs. Backends that do not run a torch module keep theirs."""
        self.encode = torch.compile(self.encode)  # type: ignore[method-assign]

    @torch.inference_mode()
    def forward(self, views: torch.Tensor, resolution: int | None = None) -> EncoderOutput:
        """Targets for a batch of [0,1] views, at `resolution` (default: native)."""
        images = self.prepare(views, resolution)
        if self.autocast_dtype is not None:
            with torch.autocast(images.device.type, dtype=self.autocast_dtype):
                out = self.encode(images)
        else:
            out = self.encode(images)
        return EncoderOutput(cls=out.cls.float(), patches=out.patches.float(), registers=None, grid=out.grid)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen experts stay in eval mode
