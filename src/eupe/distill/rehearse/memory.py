"""Per-rank memory of a rehearsed step: every storage the step allocates, by what it holds.

`MemoryTracker` is a dispatch mode under the rehearsal's FakeTensorMode. Each new storage an op
returns is counted at the size the CUDA caching allocator would hand out (rounded up to 512
bytes) and put in a category, until the storage dies. The category comes from the phase the
trainer is in when it is allocated (teacher forward, student forward/backward, optimizer step) and
from the code that allocates it (FSDP's and DDP's communication buffers), and is corrected where a
tensor's role is known only later:

    params           student (and adapter-head) parameters and buffers: FSDP's local shards
    grads            parameter gradients (found on the parameters at each new peak)
    optimizer        AdamW state
    activations      what the student forward/loss/backward allocate and keep
    teacher_weights  the frozen teachers' weights (replicated on every rank)
    teacher_forward  the teachers' working set and the targets they return
    comm_buffers     FSDP all-gathered parameters and reduce-scatter buffers, DDP gradient buckets
    other            the input views, metrics, clipping temporaries

The split is taken at the moment the total peaks, so its values sum to the peak.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ..plan.estimate import CATEGORIES

BLOCK = 512  # bytes: the CUDA caching allocator's rounding (what memory_allocated reports)
# code whose allocations are communication buffers, not the model's own tensors
COMM_CODE = (
    "/torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py",
    "/torch/distributed/fsdp/_fully_shard/_fsdp_param.py",
    "/torch/nn/parallel/distributed.py",
)


# frames between the code that calls an op and this mode (dispatch, modes, compile wrappers)
PLUMBING = (
    "/torch/_ops.py",
    "/torch/_compile.py",
    "/torch/_dynamo/eval_frame.py",
    "/torch/utils/_python_dispatch.py",
    "/torch/utils/_device.py",
    "/torch/overrides.py",
    "/torch/utils/flop_counter.py",
    "/eupe/distill/rehearse/memory.py",
    "/eupe/distill/rehearse/cluster.py",
)


def storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages that hold `t`'s data: a wrapper subclass (a DTensor: its local shard) has none of
    its own, only those of the tensors inside it."""
    if is_traceable_wrapper_subclass(t):
        inner = [getattr(t, name) for name in t.__tensor_flatten__()[0]]
        return [st for x in inner if isinstance(x, torch.Tensor) for st in storages(x)]
    if t.device.type == "meta":
        return []
    return [t.untyped_storage()]


def rounded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


@dataclass
class _Entry:
    size: int
    category: str


class MemoryTracker(TorchDispatchMode):
    """Live bytes by category, and their split at the peak (see the module docstring)."""

    def __init__(self, grads: Callable[[], Iterable[torch.Tensor]] = lambda: ()):
        super().__init__()
        self.grads = grads  # the student gradients alive now (DTensors count by their local shards)
        self.category = "other"
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.peak_split = dict(self.live)
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref] = {}
        self._resize = torch.UntypedStorage.resize_

    # -- phases and roles --------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, category: str) -> Iterator[None]:
        """New storages allocated in the block belong to `category`."""
        previous, self.category = self.category, category
        try:
            yield
        finally:
            self.category = previous

    def adopt(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count (or re-file) the storages of `tensors` under `category`."""
        for storage in (st for t in tensors for st in storages(t)):
            entry = self._entries.get(storage)
            if entry is None:
                self._add(storage, category)
            elif entry.category != category:
                self.live[entry.category] -= entry.size
                self.live[category] += entry.size
                entry.category = category

    def reset_peak(self) -> None:
        self.peak, self.peak_split = self.total, dict(self.live)

    # -- counting ----------------------------------------------------------------------------
    def _add(self, storage: torch.UntypedStorage, category: str) -> None:
        entry = _Entry(rounded(storage.nbytes()), category)
        self._entries[storage] = entry
        key = id(entry)
        self._refs[key] = weakref.ref(storage, lambda _, e=entry, k=key: self._free(e, k))
        self._grow(entry, entry.size)

    def _free(self, entry: _Entry, key: int) -> None:
        self._refs.pop(key, None)
        self.live[entry.category] -= entry.size
        self.total -= entry.size

    def _grow(self, entry: _Entry, delta: int) -> None:
        self.live[entry.category] += delta
        self.total += delta
        if delta > 0 and self.total > self.peak:
            self.peak = self.total
            self.peak_split = self._split()

    def _split(self) -> dict[str, int]:
        """The live bytes by category, with gradients moved to `grads` from where they were allocated."""
        split = dict(self.live)
        seen = set()
        for storage in (st for g in self.grads() for st in storages(g)):
            entry = self._entries.get(storage)
            if entry is None or id(entry) in seen or entry.category == "grads":
                continue
            seen.add(id(entry))
            split[entry.category] -= entry.size
            split["grads"] += entry.size
        return split

    def _category_of_new(self) -> str:
        """`comm_buffers` if the code that asked for the op is DDP's or FSDP's own, else the phase."""
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.endswith(PLUMBING):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.endswith(COMM_CODE):
            return "comm_buffers"
        return self.category

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                for storage in storages(t):
                    if storage not in self._entries and storage.nbytes():
                        self._add(storage, self._category_of_new())
        return out

    # FSDP frees and re-allocates unsharded parameters by resizing their storages, which no op sees
    def __enter__(self) -> MemoryTracker:
        tracker = self

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            result = tracker._resize(storage, size)
            entry = tracker._entries.get(storage)
            new = rounded(storage.nbytes())
            if entry is None and new:
                tracker._add(storage, "comm_buffers")
            elif entry is not None and new != entry.size:
                delta, entry.size = new - entry.size, new
                tracker._grow(entry, delta)
            return result

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        super().__exit__(*exc)
