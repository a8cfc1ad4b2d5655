"""Data parallelism under torchrun: DDP for students, FSDP2 for the large proxy (issue 6).

`torchrun --nproc_per_node N -m eupe distill CONFIG` needs no code changes: the trainer joins the
process group (gloo on CPU, nccl on GPU), each rank loads its slice of every global batch, and
every student is wrapped here:

- DDP (`DistributedDataParallel`) for ordinary students: gradients are averaged in backward,
  skipped with `no_sync()` on all but the last micro-batch of an accumulation;
- FSDP2 (`torch.distributed.fsdp.fully_shard`) for `eupe_proxy_g16` (or `train.fsdp=true`): each
  transformer block, the adapter heads and the root are sharded; optional activation
  checkpointing (`train.activation_checkpointing`, timm's per-block checkpointing). Checkpoints of
  FSDP students are DCP folders (`torch.distributed.checkpoint`), one file per rank, loadable on
  another world size; `final/` is gathered to rank 0.

Teachers are replicated on every rank (bf16 with `teachers.<name>.dtype=bf16`) and never receive
gradients (inference mode). The logged loss is averaged over ranks (`reduce_mean`), so it is the
mean over the global batch.
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
        return out, {t: self.heads(out, t) for t in teachers}


def uses_fsdp(cfg: Any, student_name: str, world: int) -> bool:
    """FSDP2 when asked (`train.fsdp=true`), or by default for the proxy under torchrun."""
    flag = getattr(cfg.train, "fsdp", None)
    if flag is None:
        return world > 1 and student_name in FSDP_BY_DEFAULT
    return bool(flag) and world > 1


def wrap_student(s: Any, cfg: Any, spec: Any, device: torch.device, world: int) -> None:
    """Give StudentState `s` its distributed forward (`s.runner`); a lone process keeps None.

    FSDP replaces the parameters with sharded ones, so the optimizer and schedule are rebuilt on
    them (nothing has been stepped yet).
    """
    if getattr(cfg.train, "activation_checkpointing", False):
        backbone = getattr(s.model, "backbone", None)
        if backbone is not None and hasattr(backbone, "set_grad_checkpointing"):
            backbone.set_grad_checkpointing(True)
    if world == 1:
        s.runner = None
        return
    wrapper = StudentForward(s.model, s.heads)
    if uses_fsdp(cfg, spec.name, world):
        from torch.distributed.fsdp import fully_shard

        from .optim import CosineSchedule, build_optimizer

        blocks = getattr(getattr(s.model, "backbone", None), "blocks", None)
        for block in blocks if blocks is not None else []:
            fully_shard(block)
        fully_shard(s.heads)
        fully_shard(wrapper)
        t = cfg.train
        s.optimizer = build_optimizer([("model", s.model), ("heads", s.heads)], t.lr, t.weight_decay, t.betas)
        s.schedule = CosineSchedule(s.optimizer, t.lr, t.max_steps, t.warmup_steps, t.min_lr)
        s.runner, s.sharded = wrapper, True
        return
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    s.runner = DistributedDataParallel(wrapper, device_ids=ids)
    s.sharded = False


def forward_student(
    s: Any, images: torch.Tensor, teachers: list[str]
) -> tuple[EncoderOutput, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The student's forward and every teacher head's projection (through DDP/FSDP if wrapped)."""
    runner = getattr(s, "runner", None)
    if runner is not None:
        return runner(images, teachers)
    out = s.model(images)
    return out, {t: s.heads(out, t) for t in teachers}


@contextlib.contextmanager
def grad_sync(s: Any, sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on micro-batches that are not the last of a step."""
    runner = getattr(s, "runner", None)
    if sync or runner is None:
        yield
    elif hasattr(runner, "no_sync"):  # DDP
        with runner.no_sync():
            yield
    else:  # FSDP2: keep unsharded gradients until the last micro-batch
        runner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            runner.set_requires_gradient_sync(True)


def synced_by_wrapper(s: Any) -> bool:
    return getattr(s, "runner", None) is not None


def reduce_mean(values: dict[str, float], world: int) -> dict[str, float]:
    """Average logged scalars over ranks (each rank's are means over its equal share)."""
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def as_local_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ of sharded (DTensor) gradients returns a DTensor: the full value."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# -- sharded checkpoints -----------------------------------------------------------------------------
def save_sharded(s: Any, directory: Path) -> None:
    """Collective: every rank writes its shards of model, heads and optimizer as DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(s.runner, s.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))


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
