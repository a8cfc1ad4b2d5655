"""DINOv3 RoPE whose coordinate grid stays on the model's device, and Meta's per-block draws.

timm's `RotaryEmbeddingDinoV3` builds the coordinate grid on the CPU and copies it to the device on
every forward of a dynamic-size ViT: one blocking host->device copy per forward on a GPU.
`DeviceGridRope` builds each grid once, with timm's own `_build_grid`, and keeps it on the device.

timm computes the RoPE embedding once per forward and hands it to every block, so a train-mode
forward has one coordinate augmentation for all blocks. Meta's ViT (facebookresearch/EUPE
`eupe/models/vision_transformer.py`, as DINOv3's) calls its RoPE module inside the block loop: one
draw per block. `rope_draws_per_block` switches a model to Meta's way (see docs/fidelity.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from timm.layers.pos_embed_sincos import (
    RotaryEmbeddingDinoV3,
    _apply_coord_augs,
    _build_grid,
    _coord_aug_config,
)
from torch import nn


class DeviceGridRope(RotaryEmbeddingDinoV3):
    """`RotaryEmbeddingDinoV3` with its un-augmented coordinate grids cached on the device.

    A grid is built on the CPU exactly as timm builds it (float32), copied once to the device of
    `periods`, and kept per (shape, device) in a plain dict: not a buffer, so state dicts and
    checkpoints are timm's. The train-time shift/jitter/rescale is applied to the cached copy, so
    on a GPU its draws come from the device generator without a sync; on the CPU the numbers and
    the RNG draws are timm's, bit for bit.
    """

    per_block = 0  # > 0: `get_embed` returns one embedding per block ([blocks, HW, 2 dim])

    def __init__(self, *args, **kwargs):
        self._grids: dict[tuple, torch.Tensor] = {}  # before timm's init, which may build a grid
        super().__init__(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._grids.clear()  # grids on the old device (or fake ones) would only hold memory
        return super()._apply(fn, *args, **kwargs)

    def _grid(self, feat_shape: list[int]) -> torch.Tensor:
        """The (H*W, 2) un-augmented float32 coordinates on the device of `periods`."""
        device = self.periods.device
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            # A traced graph (torch.compile, torch.export) builds it in-graph on the device: no
            # cache to guard on (a recompile per new shape) or to leak traced tensors into.
            return self._build(feat_shape, device)
        key = (tuple(feat_shape), device)
        if key not in self._grids:
            self._grids[key] = self._build(feat_shape, "cpu").to(device)  # as timm, but once
        return self._grids[key]

    def _build(self, feat_shape: list[int], device: torch.device | str) -> torch.Tensor:
        grid = _build_grid(
            feat_shape,
            grid_type="centered",
            grid_offset=self.grid_offset,
            grid_indexing=self.grid_indexing,
            normalize_coords=self.normalize_coords,
            device=device,
            ndim=2,
        )
        return grid.flatten(0, -2)

    def _create_embed(self, feat_shape: list[int], no_aug: bool = False) -> torch.Tensor:
        coords = self._grid(feat_shape)
        if not no_aug and self.training and self.aug_active:
            coords = _apply_coord_augs(coords, self.shift_coords, self.jitter_coords, self.rescale_coords)
        sin, cos = self._get_pos_embed_from_coords(coords)
        return torch.cat([sin, cos], dim=-1)

    def get_embed(self, shape: list[int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        embed = super().get_embed
        if not self.per_block:
            return embed(shape, dtype)
        if self.training and self.aug_active:  # one draw per block, in block order as Meta's loop
            return torch.stack([embed(shape, dtype) for _ in range(self.per_block)])
        return embed(shape, dtype).expand(self.per_block, -1, -1)  # nothing drawn: one copy, a view


def cache_rope_on_device(module: nn.Module) -> nn.Module:
    """Make every timm `RotaryEmbeddingDinoV3` in `module` a `DeviceGridRope` (in place; same
    parameters, buffers and state dict)."""
    for m in module.modules():
        if type(m) is RotaryEmbeddingDinoV3:
            m.__class__ = DeviceGridRope
            m._grids = {}
    return module


def rope_draws_per_block(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Draw the train-time RoPE augmentation once per block, as Meta's ViT does (in place).

    Uses timm Eva's per-block RoPE path (`rope_mixed`, which indexes the embedding by block) with a
    `DeviceGridRope` that returns one embedding per block. In eval mode nothing is drawn and the
    output is unchanged; `enabled=False` restores timm's once-per-forward draw.
    """
    cache_rope_on_device(model)
    for m in model.modules():
        if isinstance(getattr(m, "rope", None), DeviceGridRope) and hasattr(m, "blocks"):
            m.rope_mixed = enabled
            m.rope.per_block = len(m.blocks) if enabled else 0
    return model


@contextmanager
def rope_augment(model: nn.Module, shift=None, jitter=None, rescale=None) -> Iterator[None]:
    """Inside the `with`: every DINOv3 RoPE of `model` has these train-time coordinate augmentations,
    drawn once per block (they act in train mode only); the model's own settings come back after."""
    cache_rope_on_device(model)
    vits = [m for m in model.modules() if isinstance(getattr(m, "rope", None), DeviceGridRope)]
    saved = [
        (m, getattr(m, "rope_mixed", False), m.rope.per_block, _aug(m.rope))
        for m in vits
        if hasattr(m, "blocks")
    ]
    for m, *_ in saved:
        m.rope.shift_coords, m.rope.jitter_coords, m.rope.rescale_coords, m.rope.aug_active = (
            _coord_aug_config(shift, jitter, rescale)
        )
    rope_draws_per_block(model)
    try:
        yield
    finally:
        for m, mixed, per_block, aug in saved:
            m.rope_mixed, m.rope.per_block = mixed, per_block
            m.rope.shift_coords, m.rope.jitter_coords, m.rope.rescale_coords, m.rope.aug_active = aug


def _aug(rope: RotaryEmbeddingDinoV3) -> tuple:
    return rope.shift_coords, rope.jitter_coords, rope.rescale_coords, rope.aug_active
