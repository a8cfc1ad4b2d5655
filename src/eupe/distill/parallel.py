"""Data parallelism under torchrun: DDP for students, FSDP2 for the large proxy (issue 6, 12).

`torchrun --nproc_per_node N -m eupe distill CONFIG` needs no code changes: the trainer joins the
process group (gloo on CPU, nccl on GPU, each rank on its own `cuda:<LOCAL_RANK>`), each rank loads
its slice of every global batch, and every student is wrapped here:

- DDP (`DistributedDataParallel`) for ordinary students: gradients are averaged in backward,
  skipped with `no_sync()` on all but the last micro-batch of an accumulation; buffers are not
  re-broadcast every forward (students have no running statistics);
- FSDP2 (`torch.distributed.fsdp.fully_shard`) for `eupe_proxy_g16` (or `train.fsdp=true`): each
  block, the adapter heads and the root are sharded; on CUDA with `train.bf16` the all-gathers run
  in bf16 and gradients are reduced in fp32 (`MixedPrecisionPolicy`), every micro-batch of an
  accumulation unless `train.fsdp_reduce_every_micro=false` (`grad_sync`); optional activation
  checkpointing (`train.activation_checkpointing`, timm's per-block checkpointing). Checkpoints of
  FSDP students are DCP folders (`torch.distributed.checkpoint`), one file per rank, written in
  place (asynchronously on request) and loadable on another world size; `final/` is gathered to
  rank 0.
- `train.compile`: every block is compiled on its own before wrapping (as torchtitan does), so
  FSDP's per-block hooks stay outside the compiled graphs and Stage 3's three input sizes give
  three graphs per block, not a recompile per step.

Teachers are replicated on every rank and never receive gradients (inference mode). Logged
metrics stay on the device and are averaged over ranks only on logging steps (`read_step`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..models.encoder import EncoderOutput
from ..runtime import host_values, policy_device_type, rehearsing

FSDP_BY_DEFAULT = ("eupe_proxy_g16",)
DCP_DIR = "dcp"


class StudentForward(nn.Module):
    """Student + adapter heads as one module, so DDP/FSDP see one forward per micro-batch."""

    def __init__(self, model: nn.Module, heads: nn.Module):
        super().__init__()
        self.model, self.heads = model, heads

    def forward(
        self, images: torch.Tensor, teachers: list[str]
    ) -> tuple[EncoderOutput, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        out = self.model(images)
        return out, self.heads(out, teachers)


def uses_fsdp(cfg: Any, student_name: str, world: int) -> bool:
    """FSDP2 when asked (`train.fsdp=true`), or by default for the proxy under torchrun."""
    flag = getattr(cfg.train, "fsdp", None)
    if flag is None:
        return world > 1 and student_name in FSDP_BY_DEFAULT
    return bool(flag) and world > 1


def compile_blocks(model: nn.Module) -> None:
    """`torch.compile` each repeated block in place (module names and state dicts are unchanged)."""
    for block in model.blocks():
        block.compile()


def wrap_student(s: Any, cfg: Any, spec: Any, device: torch.device, world: int) -> None:
    """Give StudentState `s` its distributed forward (`s.runner`); a lone process keeps None.

    FSDP replaces the parameters with sharded ones, so the optimizer and schedule are rebuilt on
    them (nothing has been stepped yet).
    """
    if getattr(cfg.train, "activation_checkpointing", False):
        backbone = getattr(s.model, "backbone", None)
        if backbone is not None and hasattr(backbone, "set_grad_checkpointing"):
            backbone.set_grad_checkpointing(True)
    if getattr(cfg.train, "compile", False):
        compile_blocks(s.model)
    s.sharded = False
    fsdp = uses_fsdp(cfg, spec.name, world)
    if s.model.family == "convnext" and policy_device_type(device) == "cuda" and not fsdp:
        # NHWC convolutions on tensor cores; FSDP shards contiguous parameters only (the inputs
        # still go channels_last, which is what picks the NHWC kernels)
        s.model.to(memory_format=torch.channels_last)
    if world == 1:
        s.runner = None
        return
    wrapper = StudentForward(s.model, s.heads)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from .optim import build_optimization

        mp = {}
        if policy_device_type(device) == "cuda" and cfg.train.bf16:
            mp["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in s.model.blocks():
            fully_shard(block, **mp)
        fully_shard(s.heads, **mp)
        fully_shard(wrapper, **mp)
        s.optimizer, s.schedule = build_optimization(
            [("model", s.model), ("heads", s.heads)], cfg.train, device
        )
        s.runner, s.sharded = wrapper, True
        return
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # no buffer broadcast before every forward: students hold no running statistics
    sync = "forward_sync_buffers" if "forward_sync_buffers" in _ddp_args() else "broadcast_buffers"
    # a rehearsal's ranks are fake: there are no weights to compare or broadcast at start-up
    init = {"init_sync": False} if rehearsing() else {}
    s.runner = DistributedDataParallel(wrapper, device_ids=ids, **{sync: False}, **init)


def _ddp_args() -> set[str]:
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    return set(inspect.signature(DistributedDataParallel.__init__).parameters)


def forward_student(
    s: Any, images: torch.Tensor, teachers: list[str]
) -> tuple[EncoderOutput, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The student's forward and every teacher head's projection (through DDP/FSDP if wrapped)."""
    runner = getattr(s, "runner", None)
    if runner is not None:
        return runner(images, teachers)
    out = s.model(images)
    return out, s.heads(out, teachers)


@contextlib.contextmanager
def grad_sync(s: Any, sync: bool, fsdp_every_micro: bool = True) -> Iterator[None]:
    """Skip the gradient reduction on micro-batches that are not the last of a step, where that
    costs no memory.

    DDP (`no_sync`): every rank holds full gradients anyway, so skipping saves communication only.
    FSDP2: skipping keeps every rank's *unsharded* fp32 gradients until the last micro-batch
    (4 bytes x all parameters: +7.4 GB for the proxy), so by default (`fsdp_every_micro`,
    `train.fsdp_reduce_every_micro`) FSDP reduce-scatters every micro-batch and keeps 1/N shards.
    """
    runner = getattr(s, "runner", None)
    if sync or runner is None or (getattr(s, "sharded", False) and fsdp_every_micro):
        yield
    elif hasattr(runner, "no_sync"):  # DDP
        with runner.no_sync():
            yield
    else:  # FSDP2, asked to trade memory for fewer reduce-scatters
        runner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            runner.set_requires_gradient_sync(True)


def synced_by_wrapper(s: Any) -> bool:
    return getattr(s, "runner", None) is not None


def read_step(
    shared: dict[str, torch.Tensor], local: dict[str, torch.Tensor], world: int
) -> tuple[dict[str, float], dict[str, float]]:
    """The step's one device -> host read: `shared` values (the same on every rank, e.g. global
    gradient norms) as they are, `local` ones (each rank's mean over its share) averaged over ranks.

    `local` is empty on steps that log nothing, so those steps all-reduce nothing.
    """
    keys, lkeys = sorted(shared), sorted(local)
    parts = [torch.stack([shared[k].detach().double() for k in keys])] if keys else []
    if lkeys:
        summed = torch.stack([local[k].detach().double() for k in lkeys])
        if world > 1:
            dist.all_reduce(summed)  # SUM then divide: gloo (CPU) has no AVG
            summed = summed / world
        parts.append(summed)
    if not parts:
        return {}, {}
    values = host_values(torch.cat([p.reshape(-1) for p in parts]))
    return dict(zip(keys, values[: len(keys)])), dict(zip(lkeys, values[len(keys) :]))


def as_local_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ of sharded (DTensor) gradients returns a DTensor: the full value."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# -- sharded checkpoints -----------------------------------------------------------------------------
def save_sharded(s: Any, directory: Path, process_group: Any = None, asynchronous: bool = False) -> Any:
    """Collective: every rank writes its shards of model, heads and optimizer as DCP, in place.

    `asynchronous`: the state is staged to host memory before this returns and written in the
    background; the returned future completes when this rank's part is on disk (else None).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(s.runner, s.optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if asynchronous:
        return dcp.async_save(state, checkpoint_id=str(directory), process_group=process_group)
    dcp.save(state, checkpoint_id=str(directory), process_group=process_group)
    return None


def load_sharded(s: Any, directory: Path) -> None:
    """Load a DCP checkpoint, resharded to this world size (collective when sharded).

    Works for an unsharded student too (e.g. resuming an FSDP run in one process): the keys are
    those of `StudentForward`, with or without FSDP.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    module = s.runner if getattr(s, "sharded", False) else StudentForward(s.model, s.heads)
    model_sd, optim_sd = get_state_dict(module, s.optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(module, s.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Collective for sharded modules: the whole state dict, on CPU (complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
