"""The "eupe" teacher backend: a model this project trained, e.g. the Stage-1 proxy.

Stages 2 and 3 distill from the proxy alone; its targets are its own class token and patch
tokens (registers dropped). Inputs use ImageNet mean/std, like every eupe encoder, at 256 px by
default (the Stage-2 resolution).
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import torch

from ..errors import ConfigError
from ..models.encoder import EncoderOutput
from ..models.loading import create_model
from ..models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..models.zoo import ZOO
from .base import Teacher, register_teacher, rng_devices, weights_to_bf16


class EupeTeacher(Teacher):
    """A trained eupe encoder (a `final/` or `save_pretrained` folder) as a frozen teacher.

    `source` is that folder; or a zoo name, optionally with `weights` (a file this project or Meta
    wrote). A bare zoo name builds a seeded random model (tests, planning on the meta device).
    """

    def __init__(
        self,
        source: str,
        weights: str | None = None,
        resolution: int | None = None,
        mean: tuple[float, ...] = (),
        std: tuple[float, ...] = (),
        dtype: str = "fp32",
        overrides: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        if not source:
            raise ConfigError(
                "eupe teacher: set checkpoint=<output_dir>/final (a folder written by `eupe distill`)"
            )
        if source not in ZOO and not os.path.isdir(source):
            raise ConfigError(
                f"eupe teacher: {source!r} is neither a folder (expected <output_dir>/final with config.json) "
                f"nor a zoo name ({', '.join(ZOO)})"
            )
        with torch.random.fork_rng(devices=rng_devices()):
            torch.manual_seed(seed)
            if source in ZOO:
                encoder = create_model(source, weights=weights, **(overrides or {}))
            else:
                encoder = create_model(source)
        resolution = int(resolution or 256)
        super().__init__(
            resolution,
            encoder.stride,
            tuple(mean) or IMAGENET_MEAN,
            tuple(std) or IMAGENET_STD,
            torch.bfloat16 if dtype == "bf16" else None,
        )
        self.source = source
        self.encoder = encoder.eval().requires_grad_(False)
        if dtype == "bf16":
            weights_to_bf16(self.encoder)
        self.cls_dim = self.patch_dim = int(encoder.embed_dim)

    def encode(self, images: torch.Tensor) -> EncoderOutput:
        out = self.encoder(images)
        return EncoderOutput(cls=out.cls, patches=out.patches, registers=None, grid=out.grid)


@register_teacher("eupe")
def build_eupe_teacher(
    model: str = "",
    checkpoint: str | None = None,
    resolution: int | None = None,
    mean: tuple[float, ...] = (),
    std: tuple[float, ...] = (),
    dtype: str = "fp32",
    kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    name: str = "",
    **_ignored: Any,
) -> EupeTeacher:
    """`checkpoint` is the trained folder (or a weights file for zoo `model`); `model` may be the folder."""
    if checkpoint and not os.path.exists(checkpoint):
        raise ConfigError(
            f"eupe teacher: checkpoint={checkpoint!r} does not exist; use the final/ folder of the run that "
            "trained it (e.g. runs/stage1/final)"
        )
    if checkpoint and os.path.isdir(checkpoint):
        source, weights = checkpoint, None
    elif checkpoint:
        if model not in ZOO:
            raise ConfigError(
                f"eupe teacher: checkpoint={checkpoint!r} is not a folder; a weights file needs model=<zoo name> "
                f"({', '.join(ZOO)})"
            )
        source, weights = model, checkpoint
    else:
        source, weights = model, None
    seed = seed + (zlib.crc32(name.encode()) % 10_000 if name else 0)
    return EupeTeacher(source, weights, resolution, mean, std, dtype, overrides=kwargs, seed=seed)
