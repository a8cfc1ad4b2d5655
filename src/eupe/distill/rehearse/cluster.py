"""A cluster on a laptop: one process plays rank 0 of WORLD ranks, with no GPU and no memory.

- a fake process group (`FakeStore`, the "fake" backend): every collective returns at once, so
  DDP, FSDP2 and the trainer's own all-reduces run their real code paths for WORLD ranks;
- `FakeTensorMode`: tensors have shapes, dtypes and storages but no data, so a 1.9B proxy and
  4B of teachers cost nothing to "allocate" and a step costs only Python time;
- the target's policies (`runtime.rehearsal`): bf16 teachers, fused AdamW, FSDP's bf16
  mixed-precision policy, channels_last, as on the GPU; the tensors themselves are CPU tensors,
  so autocast is CPU autocast in bf16, with CUDA's fp32 norms put back (`cuda_autocast_norms`), and
  the attention kernel is the CPU flash kernel (it saves what the GPU's flash kernel saves);
- `HostConstants` while models are built: library code that reads a small tensor it just made on
  the host (timm's drop-path rates: `linspace(...).tolist()`) gets real values, computed aside.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from ...runtime import rehearsal
from ..plan.measure import cuda_autocast_norms

SHADOW_LIMIT = 4096  # elements: host constants are small (drop-path rates, RoPE periods)
# a tensor attribute, not a weak dictionary: modules swap parameters, which refuses weakly referenced tensors
SHADOW = "_rehearsal_value"


class HostConstants(TorchDispatchMode):
    """Under a FakeTensorMode: keep a real copy ("shadow") of every small tensor computed only from
    Python numbers and other shadowed tensors, so `.item()`/`.tolist()` on it returns its value and
    ops whose output shape depends on values (`nonzero`, as DeviceMesh uses) get their real shape.

    Random and in-place ops end a tensor's shadow (its value is no longer known). Everything else
    stays fake; this only lets construction code that reads its own constants run.
    """

    def __init__(self, mode: FakeTensorMode):
        super().__init__()
        self.mode = mode
        # FakeTensorMode memoizes fake tensors it has seen in a weak-value map; a weakly referenced
        # tensor cannot be swapped, and `module.to()` swaps fake parameters: forget them after each op
        self.memo = mode.fake_tensor_converter.meta_converter.tensor_memo

    @staticmethod
    def _real(x: Any) -> Any:
        return getattr(x, SHADOW, x) if isinstance(x, torch.Tensor) else x

    def _run_real(self, func: Any, args: tuple, kwargs: dict) -> Any:
        with _disable_current_modes():  # real, and not counted as device memory by a tracker
            return func(*tree_map(self._real, args), **tree_map(self._real, kwargs))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        pure = not func._schema.is_mutable and torch.Tag.nondeterministic_seeded not in func.tags
        known = pure and all(hasattr(t, SHADOW) for t in tensors)
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            if not known:
                raise
            real = self._run_real(func, args, kwargs)  # `.item()` (a number), `nonzero` (a shape)
            if not isinstance(real, (torch.Tensor, tuple, list)):
                return real
            out = tree_map(lambda t: self.mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, real)
        self.memo.clear()
        if func._schema.is_mutable:
            for t in tensors:
                if hasattr(t, SHADOW):
                    delattr(t, SHADOW)
            return out
        fakes = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if known and fakes and all(t.numel() <= SHADOW_LIMIT for t in fakes):
            reals = [
                t for t in tree_flatten(self._run_real(func, args, kwargs))[0] if isinstance(t, torch.Tensor)
            ]
            for fake, value in zip(fakes, reals):
                setattr(fake, SHADOW, value)
        return out


@contextlib.contextmanager
def fake_cluster(world: int, device_type: str = "cuda") -> Iterator[FakeTensorMode]:
    """Rank 0 of `world` fake ranks, fake tensors, and `device_type`'s policies; yields the mode.

    The environment torchrun would set (WORLD_SIZE, RANK, LOCAL_RANK) is set for the block, so
    configs validate and micro-batches divide as on the cluster; all of it is restored after.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a rehearsal needs a process without a process group (it creates a fake one)")
    with rank0_of(world):
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        try:
            norms = cuda_autocast_norms() if device_type == "cuda" else contextlib.nullcontext()
            with rehearsal(device_type), mode, norms:
                yield mode
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def rank0_of(world: int) -> Iterator[None]:
    """The environment torchrun gives rank 0 of `world` (WORLD_SIZE, RANK, LOCAL_RANK), restored after."""
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    os.environ.update(WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
