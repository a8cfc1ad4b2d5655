"""Process-level setup for anything that may run under torchrun: world size, device, process group,
seeds, and the rules that keep a multi-GPU run from hanging or silently waiting on the GPU.

The order matters on a GPU node. `pick_device` chooses `cuda:<LOCAL_RANK>` and makes it the current
device before any CUDA work, so FSDP shards, NCCL communicators, pinned-memory threads and
`.cuda()` calls all land on this rank's GPU; `init_distributed` then joins the NCCL group bound to
that device (`device_id`), or gloo on CPU.

A failure on one rank must stop every rank within seconds, not after a 30-minute collective
timeout: `fail_together` turns an error on any rank into the same error on all of them, and the
trainer decides divergence from a value all ranks share (the global gradient norm).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake

from .errors import ConfigError, EupeError


def world_size() -> int:
    """Number of data-parallel processes (torchrun's WORLD_SIZE; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global index (torchrun's RANK; 0 otherwise), readable before the group is joined."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


# The device type whose policies apply whatever device tensors live on, and whether this process is a
# rehearsal (`eupe distill --rehearse`: fake ranks, fake CPU tensors standing in for a GPU's). Both
# are unset in every real run.
_POLICY_TYPE: str | None = None
_REHEARSAL = False


def policy_device_type(device: torch.device | str) -> str:
    """The device type that decides hardware policies: bf16 teachers, fused AdamW, FSDP mixed
    precision, channels_last ConvNeXt. `device.type` in a real run; under `policies_for` the type
    given there (a rehearsal's tensors live on the CPU but follow a GPU's policies)."""
    return _POLICY_TYPE or torch.device(device).type


@contextlib.contextmanager
def policies_for(device_type: str) -> Iterator[None]:
    """Apply `device_type`'s policies to tensors on any device (rehearsals; CPU tests of GPU paths)."""
    global _POLICY_TYPE
    previous, _POLICY_TYPE = _POLICY_TYPE, device_type
    try:
        yield
    finally:
        _POLICY_TYPE = previous


def rehearsing() -> bool:
    """Inside `rehearsal`: the other ranks and all tensors are fake (nothing to broadcast or compare)."""
    return _REHEARSAL


@contextlib.contextmanager
def rehearsal(device_type: str) -> Iterator[None]:
    """A rehearsal for `device_type`: its policies, and collectives that carry no values."""
    global _REHEARSAL
    previous, _REHEARSAL = _REHEARSAL, True
    try:
        with policies_for(device_type):
            yield
    finally:
        _REHEARSAL = previous


def pick_device(
    name: str | torch.device = "auto", *, setting: str = "device", tf32: bool = False
) -> torch.device:
    """The device of this process (training, caching, evaluation, VLM benchmarks); a CUDA device
    is made current here, before any CUDA work.

    "auto" is `cuda:<LOCAL_RANK>` when CUDA is available, else the CPU. A bare "cuda" also takes
    the local rank's GPU; "cuda:N" is taken as given. `setting` is the option errors name (e.g.
    "train.device"). `tf32=True` lets float32 matmuls run on tensor cores (TF32): training wants
    the speed for its fp32 leftovers (teachers, losses); evaluation keeps PyTorch's full-precision
    matmuls, so its numbers do not change with the GPU generation.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{setting}={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"{setting}={name!r} but CUDA is not available here; use {setting}=cpu")
    if device.index is None:
        index, count = local_rank(), torch.cuda.device_count()
        if index >= count:
            raise ConfigError(
                f"LOCAL_RANK={index} but this node has {count} GPU(s); start at most {count} processes "
                "per node (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun.

    NCCL is bound to `device` (`device_id`, so communicators are created eagerly on the right GPU);
    gloo serves CPU runs. The timeout bounds how long a rank waits for one that died without a word.
    """
    ws = world_size()
    if ws == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), ws


def shutdown() -> None:
    """Leave the process group cleanly (after a successful run; on errors the process just exits)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and the current CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """A seed for `rank`'s own random draws (drop path, RoPE jitter): independent across ranks and
    a pure function of (seed, rank), so a resumed or re-launched rank draws the same stream."""
    return int(np.random.SeedSequence([seed, rank, 0x5EED]).generate_state(1, np.uint64)[0] >> 1)


# -- failing together ---------------------------------------------------------------------------------
class RankFailed(EupeError):
    """Another rank raised an error; this rank stops with the same message and exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def fail_together(world: int) -> Iterator[None]:
    """Run a block that holds no collective; an `EupeError` on any rank is raised on every rank.

    Each rank reports (in one all-gather) whether its block failed; the lowest failing rank's
    message is raised everywhere, so no rank walks on into a collective that would wait for the
    failed one until the timeout.
    """
    error: EupeError | None = None
    try:
        yield
    except EupeError as e:
        error = e
    if world > 1 and not rehearsing():  # a rehearsal's other ranks are fake: this one speaks for all
        mine = None if error is None else (str(error), getattr(error, "exit_code", 2))
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        failed = [(r, m) for r, m in enumerate(everyone) if m is not None]
        if failed and error is None:
            rank, (message, code) = failed[0]
            raise RankFailed(f"rank {rank}: {message}", code)
    if error is not None:
        raise error


# -- host syncs -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def allowed_sync() -> Iterator[None]:
    """Mark the one intended GPU -> CPU read of a step: under `torch.cuda.set_sync_debug_mode("error")`
    (benchmarks/gpu_check.py) any other synchronizing call in the step raises."""
    if not torch.cuda.is_available():
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def host_values(t: torch.Tensor) -> list[float]:
    """The values of a small device tensor on the host: the step's single synchronization.

    A fake tensor (a rehearsal) has no values: it reads as zeros, finite like a healthy step's."""
    if is_fake(t):
        return [0.0] * t.numel()
    with allowed_sync():
        return t.detach().double().cpu().tolist()
