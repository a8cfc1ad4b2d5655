"""DINOv3 RoPE whose coordinate grid stays on the model's device.

timm's `RotaryEmbeddingDinoV3` builds the coordinate grid on the CPU and copies it to the device on
every forward of a dynamic-size ViT: one blocking host->device copy per forward on a GPU.
`DeviceGridRope` builds each grid once, with timm's own `_build_grid`, and keeps it on the device.
"""

from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3, _apply_coord_augs, _build_grid
from torch import nn


class DeviceGridRope(RotaryEmbeddingDinoV3):
    """`RotaryEmbeddingDinoV3` with its un-augmented coordinate grids cached on the device.

    A grid is built on the CPU exactly as timm builds it (float32), copied once to the device of
    `periods`, and kept per (shape, device) in a plain dict: not a buffer, so state dicts and
    checkpoints are timm's. The train-time shift/jitter/rescale is applied to the cached copy, so
    on a GPU its draws come from the device generator without a sync; on the CPU the numbers and
    the RNG draws are timm's, bit for bit.
    """

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


def cache_rope_on_device(module: nn.Module) -> nn.Module:
    """Make every timm `RotaryEmbeddingDinoV3` in `module` a `DeviceGridRope` (in place; same
    parameters, buffers and state dict)."""
    for m in module.modules():
        if type(m) is RotaryEmbeddingDinoV3:
            m.__class__ = DeviceGridRope
            m._grids = {}
    return module
