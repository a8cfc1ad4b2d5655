"""The estimate: FLOPs per step, memory per GPU, wall-clock days, images seen.

Per-image numbers come from `measure` (meta device); everything here is arithmetic on them, and
each formula is written next to its value in the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ...errors import ConfigError
from .measure import BF16, ModelCost, size_model
from .spec import PlanSpec

GIB = 2**30
# what a GPU's memory holds during a step: the terms of `memory` and the rows `eupe distill
# --rehearse` measures
CATEGORIES = (
    "params",
    "grads",
    "optimizer",
    "activations",
    "teacher_weights",
    "teacher_forward",
    "comm_buffers",
    "other",
)
# device memory outside PyTorch's tensors (CUDA context, NCCL buffers, cuBLAS/cuDNN workspaces): an
# allowance, the same one `eupe distill --rehearse` adds
OUTSIDE_TENSORS = 2 * GIB


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_bf16: float  # dense bf16 tensor-core FLOP/s (no sparsity)
    memory: float  # bytes of device memory


MIB = 2**20
# memory: the bytes the device reports (torch.cuda.get_device_properties().total_memory)
GPUS = {
    "h100": Gpu("H100 SXM 80GB", 989e12, 81559 * MIB),
    "h200": Gpu("H200 SXM 141GB", 989e12, 143771 * MIB),  # same compute as H100, more and faster memory
    "a100": Gpu("A100 SXM 80GB", 312e12, 81920 * MIB),
    "a100-40gb": Gpu("A100 SXM 40GB", 312e12, 40960 * MIB),
}


def _mean(d: dict[int, float], keys: list[int]) -> float:
    return sum(d[k] for k in keys) / len(keys)


def heads_forward_flops(
    student_dim: int, hidden: int, teacher_dims: list[tuple[int, int]], n_patches: int
) -> float:
    """Adapter heads (Linear D_S->H, LN, GELU, Linear H->D_T, no bias), one image:
    sum_t 2*H*(D_S + C_t) [cls token] + 2*N_S*H*(D_S + P_t) [patch tokens]."""
    return sum(
        2.0 * hidden * (student_dim + c) + 2.0 * n_patches * hidden * (student_dim + p)
        for c, p in teacher_dims
    )


def heads_params(student_dim: int, hidden: int, teacher_dims: list[tuple[int, int]]) -> int:
    """Two heads per teacher: H*(D_S + D_T) weights + 2H LayerNorm."""
    return sum(hidden * (2 * student_dim + c + p) + 4 * hidden for c, p in teacher_dims)


def heads_activation_bytes(student_dim: int, hidden: int, n_teachers: int, n_tokens: int) -> float:
    """Saved for backward per image, bf16: per head per token fc1 out (LN in), LN out (GELU in),
    GELU out (fc2 in) = 3*H*2 bytes + 8 bytes fp32 LN stats; the student output is saved once."""
    return n_tokens * (2 * n_teachers * (3 * hidden * BF16 + 8) + student_dim * BF16)


def measure_costs(spec: PlanSpec, progress: Callable[[str], None] | None = None) -> dict[str, ModelCost]:
    """Per-image costs of the student and every teacher at every resolution they see."""
    costs = {
        key: size_model(net.model, "eupe", net.model, net.resolutions, net.kwargs, True, progress)
        for key, net in spec.student_nets().items()
    }
    for name, t in spec.teachers.items():
        costs[name] = size_model(name, t.backend, t.model, t.resolutions, t.kwargs, False, progress)
    return costs


def memory(
    spec: PlanSpec, costs: dict[str, ModelCost], gpus: int, micro: int, fsdp: bool, ckpt: bool
) -> dict[str, float]:
    """Bytes per device, in the categories `eupe distill --rehearse` measures. P = students + heads
    parameters (a family holds every student), n = gpus if FSDP shards them (else 1); teachers are
    replicated on every rank, as the trainer runs them; activations are the largest student's (each
    frees its own after backward)."""
    nets = spec.student_nets()
    teachers = [costs[t] for t in spec.teachers]
    dims = [(t.cls_dim, t.embed_dim) for t in teachers]
    p = sum(costs[k].params + heads_params(costs[k].embed_dim, spec.hidden_dim, dims) for k in nets)
    n = gpus if fsdp else 1

    def student_act(key: str) -> float:
        s, r = costs[key], max(nets[key].resolutions)  # peak memory is set by the largest draw
        act = s.act_ckpt_bytes[r] if ckpt else s.act_bytes[r]
        return act + heads_activation_bytes(
            s.embed_dim, spec.hidden_dim, len(teachers), s.patch_tokens(r) + 1
        )

    act = max(student_act(k) for k in nets)
    teacher_ws = max(
        t.tokens(max(spec.teachers[k].resolutions))
        * (2 * t.embed_dim + max(3 * t.embed_dim, t.mlp_dim))
        * BF16
        for k, t in zip(spec.teachers, teachers)
    )
    targets = sum(
        (t.patch_tokens(max(spec.teachers[k].resolutions)) + 1) * t.embed_dim * 4
        for k, t in zip(spec.teachers, teachers)
    )
    side = max(r for net in [*nets.values(), *spec.teachers.values()] for r in net.resolutions)
    view = 3 * side * side * 4  # one fp32 input view at the largest side any network sees
    block = max(costs[k].max_block_params for k in nets)
    mem = {
        "params": 4.0 * p / n,
        "grads": 4.0 * p / n,
        "optimizer": 8.0 * p / n,
        "activations": micro * act,
        "teacher_weights": BF16 * sum(t.params for t in teachers),
        "teacher_forward": micro * (teacher_ws + targets),
        # FSDP: a block gathered in bf16 and the next prefetched, one block's fp32 gradients before
        # their reduce-scatter; DDP: its fp32 gradient buckets
        "comm_buffers": (2 * BF16 + 4) * block if fsdp else 4.0 * p,
        "other": micro * view + OUTSIDE_TENSORS,  # input views + CUDA/NCCL allowance
    }
    mem["total"] = sum(mem.values())
    per_image = act + teacher_ws + targets + view
    mem["per_image"] = per_image
    mem["fixed"] = mem["total"] - micro * per_image
    return mem


def plan(
    spec: PlanSpec,
    *,
    gpus: int,
    gpu: str = "h100",
    mfu: float = 0.4,
    fsdp: bool | None = None,
    checkpointing: bool | None = None,
    micro_batch: int | None = None,
    dataset_size: int | None = None,
    costs: dict[str, ModelCost] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The full estimate as a JSON-ready dict: inputs, measured per-image costs, FLOPs, memory
    (all four FSDP x checkpointing variants, the chosen one marked), days, images seen."""
    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu!r} is not known; choose one of {', '.join(GPUS)}")
    if gpus <= 0 or not 0 < mfu <= 1:
        raise ConfigError(f"need --gpus > 0 and 0 < --mfu <= 1; got --gpus {gpus} --mfu {mfu}")
    hw = GPUS[gpu]
    costs = costs or measure_costs(spec, progress)
    nets = spec.student_nets()
    teacher_fwd = {k: _mean(costs[k].fwd_flops, t.resolutions) for k, t in spec.teachers.items()}
    dims = [(costs[k].cls_dim, costs[k].embed_dim) for k in spec.teachers]
    if fsdp is None:  # the config's train.fsdp, else FSDP for students over 1B (the trainer's proxy default)
        fsdp = spec.fsdp if spec.fsdp is not None else any(costs[k].params > 1e9 for k in nets)
    if checkpointing is None:  # the config's train.activation_checkpointing
        checkpointing = spec.activation_checkpointing
    per_image = {f"teacher {k} forward": v for k, v in teacher_fwd.items()}  # once, for every student
    students_fwd = 0.0
    for key, net in nets.items():
        s, rs = costs[key], net.resolutions
        fwd = _mean(s.fwd_flops, rs)
        heads = sum(
            heads_forward_flops(s.embed_dim, spec.hidden_dim, dims, s.patch_tokens(r)) for r in rs
        ) / len(rs)
        name = "" if key == "student" else key.split(" ", 1)[1] + " "
        per_image[f"{key} forward"] = fwd
        per_image[f"{key} backward (2x forward)"] = 2 * fwd
        per_image[f"heads {name}forward+backward (3x forward)"] = 3 * heads
        students_fwd += fwd
    model_img = sum(per_image.values())
    recompute_img = students_fwd if checkpointing else 0.0
    step = spec.global_batch * (model_img + recompute_img)
    total = step * spec.max_steps
    seconds = total / (gpus * hw.peak_bf16 * mfu)
    micro = micro_batch or spec.micro_batch or max(1, spec.global_batch // (gpus * spec.accum_steps))
    if micro * gpus > spec.global_batch:
        raise ConfigError(
            f"--micro-batch {micro} x --gpus {gpus} exceeds train.global_batch={spec.global_batch}"
        )
    accum = math.ceil(spec.global_batch / (micro * gpus))
    variants = {}
    for f in (False, True):
        for c in (False, True):
            m = memory(spec, costs, gpus, micro, f, c)
            m["max_micro_batch"] = max(0, math.floor((hw.memory - m["fixed"]) / m["per_image"]))
            variants[("fsdp" if f else "ddp") + ("+ckpt" if c else "")] = m
    chosen = ("fsdp" if fsdp else "ddp") + ("+ckpt" if checkpointing else "")
    images = spec.global_batch * spec.max_steps
    size = dataset_size or spec.dataset_size
    return {
        "config": spec.name,
        "spec": asdict(spec),
        "hardware": {
            "gpu": hw.name,
            "gpus": gpus,
            "peak_bf16_flops": hw.peak_bf16,
            "memory_bytes": hw.memory,
            "mfu": mfu,
        },
        "parallelism": {
            "chosen": chosen,
            "fsdp": fsdp,
            "activation_checkpointing": checkpointing,
            "micro_batch": micro,
            "accum_steps": accum,
        },
        "models": {k: {kk: vv for kk, vv in asdict(c).items()} for k, c in costs.items()},
        "flops": {
            "per_image": per_image,
            "per_image_model": model_img,
            "per_image_recompute": recompute_img,
            "per_step": step,
            "total": total,
            "formula": "per_step = global_batch * (sum_t E_r[F_t(r)] + 3*E_r[F_S(r)] + 3*E_r[F_H(r)]"
            " + ckpt*E_r[F_S(r)]); total = per_step * max_steps",
        },
        "memory": {"variants": variants, "chosen": chosen, "formula": MEMORY_FORMULA},
        "time": {
            "seconds": seconds,
            "days": seconds / 86400,
            "gpu_hours": seconds * gpus / 3600,
            "formula": f"days = total / ({gpus} GPUs * {hw.peak_bf16 / 1e12:.0f}e12 FLOP/s * MFU {mfu}) / 86400",
        },
        "images": {
            "seen": images,
            "dataset_size": size,
            "epochs": images / size if size else None,
            "formula": "seen = global_batch * max_steps; epochs = seen / dataset_size",
        },
    }


MEMORY_FORMULA = (
    "P = student(s) + heads params, n = GPUs with FSDP else 1, b = micro-batch; params 4P/n (fp32 master), "
    "grads 4P/n (fp32), optimizer 8P/n (AdamW m, v fp32), activations b*A (A measured per image for the "
    "largest student at its largest draw, as trained: bf16 autocast, fp32 norms; ckpt: block inputs + one "
    "block), teacher_weights 2*sum P_t (bf16, replicated on every rank), teacher_forward "
    "b*(T*(2D+max(3D,D_mlp))*2 working set + sum_t (N_t+1)*D_t*4 fp32 targets), comm_buffers FSDP "
    "(2*2+4)*largest block (bf16 all-gather + prefetch, fp32 reduce-scatter) / DDP 4P (gradient buckets), "
    "other b*3*S^2*4 (fp32 input views) + 2 GiB (CUDA context, NCCL, workspaces)"
)
