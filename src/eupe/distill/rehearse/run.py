"""`eupe distill CONFIG --rehearse WORLD`: run the real trainer as rank 0 of WORLD ranks, on fake
tensors, and measure what one GPU would hold and compute.

What runs is the trainer itself: `load_config`, the teachers built from their specs, `Distiller`
(students, heads, DDP/FSDP2 wrapping, fused AdamW, the schedule) and its `train_step` (teacher
forward, student forward and backward over every micro-batch, gradient sync, clipping, the
step's one host read, the optimizer step). Only what touches the outside world is replaced:

- the process group is fake and tensors are fake (`cluster.fake_cluster`), with the target's
  policies (bf16, fused AdamW, FSDP mixed precision);
- teachers are built without weights (random init on fake tensors) and `student.init` is not
  read, so nothing is downloaded or loaded; an eupe teacher whose folder does not exist yet is
  sized as `eupe plan` sizes it by default (the zoo proxy);
- batches are synthetic views on the device; TeacherNorm is taken as measured;
- nothing is written: no output folder, metrics or checkpoints (so no DCP staging either).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ...errors import ConfigError
from ..config import DistillConfig, load_config, micro_batch
from ..parallel import uses_fsdp
from ..plan.estimate import GPUS as PLAN_GPUS
from ..plan.estimate import OUTSIDE_TENSORS  # CUDA context, NCCL buffers, workspaces: no tracker sees them
from ..targets import LiveTeachers, ViewBatch
from ..trainer import Distiller
from .cluster import HostConstants, fake_cluster, rank0_of
from .memory import CATEGORIES, MemoryTracker

GIB = 2**30


# the GPUs a rehearsal fits against (`--gpu`): `eupe plan`'s, by their memory
GPUS = {"h100-80gb": PLAN_GPUS["h100"], "h200-141gb": PLAN_GPUS["h200"], "a100-80gb": PLAN_GPUS["a100"]}
GPUS["a100-40gb"] = PLAN_GPUS["a100-40gb"]


# -- the parts that replace the outside world ---------------------------------------------------------
class SyntheticBatches:
    """Endless batches of one set of views made on the device (fake): the loader's interface."""

    def __init__(self, batch: int, side: int, device: torch.device):
        self.views = torch.rand(batch, 3, side, side, device=device)

    def __iter__(self) -> Iterator[ViewBatch]:
        while True:
            yield ViewBatch(self.views)

    def state_dict(self) -> dict:
        return {}

    def stats(self) -> dict:
        return {"skipped": 0, "examples": []}


class RehearsedTeachers(LiveTeachers):
    """The config's teachers, built without weights; targets as in a live run."""

    def __init__(self, cfg: DistillConfig, device: torch.device, tracker: MemoryTracker):
        with tracker.phase("teacher_weights"):
            super().__init__(cfg, device)
        self.tracker = tracker
        self.norm.frozen.fill_(True)  # TeacherNorm is measured before training; here it is taken as done

    def loader(self, data, batch_size, view_size, seed, rank, world, device=None, accum=1) -> Any:
        with self.tracker.phase("other"):
            return SyntheticBatches(batch_size, view_size, device)

    def prepare(self, next_batch: Callable[[], Any], batches: int, progress: bool) -> None:
        pass

    def targets(self, batch: Any, resolutions: dict[str, int | None]) -> dict:
        with self.tracker.phase("teacher_forward"):
            return super().targets(batch, resolutions)


class RehearsedDistiller(Distiller):
    """The trainer, with its file and data I/O left out and its phases told to the tracker."""

    def __init__(self, cfg: DistillConfig, source: RehearsedTeachers, tracker: MemoryTracker):
        self.tracker = tracker
        super().__init__(cfg, source=source)
        self._window = (0, time.perf_counter())  # what `train` sets before its first step
        self.sampler = FixedScale(max(cfg.pyramid))  # Stage 3: every network at its largest draw
        for s in self.students.values():
            if hasattr(s.runner, "register_comm_hook"):  # DDP
                s.runner.register_comm_hook(None, _bucket_allreduce)
                s.runner.reducer = _KeepBuckets(s.runner.reducer)

    def _start(self) -> None:  # no output folder
        pass

    def _setup_checkpointing(self) -> None:  # no checkpoints, no checkpoint process group
        self._async, self._ckpt_group, self._pending = False, None, None

    def _log(self, logged: dict[str, float], lrs: dict[str, float]) -> dict:
        return logged

    def train_step(self) -> dict | None:
        with self.tracker.phase("activations"):
            return super().train_step()

    def _next_batch(self):
        with self.tracker.phase("other"):
            return super()._next_batch()

    def clip_gradients(self, s):
        with self.tracker.phase("other"):
            return super().clip_gradients(s)

    def optimizer_step(self, s) -> None:
        with self.tracker.phase("optimizer"):
            super().optimizer_step(s)


class FixedScale:
    """The pyramid sampler, drawing one chosen scale: the largest for memory (the peak), each in turn
    for FLOPs (their mean is the expected cost of the uniform draws)."""

    def __init__(self, side: int):
        self.side = side

    def draw(self) -> int:
        return self.side


class _KeepBuckets:
    """DDP's reducer without its one-off bucket rebuild at the second step: the rebuild agrees on the
    new bucket order by reading a broadcast tensor, which has no value on a fake group. The buckets
    hold the same gradients in either order, so the memory is the same."""

    def __init__(self, reducer: Any):
        self._reducer = reducer

    def _rebuild_buckets(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reducer, name)


def _bucket_allreduce(state, bucket):  # no annotations: DDP checks them against its own types
    """DDP's all-reduce of one gradient bucket on the fake group. The fake group's own work has no
    result tensor, which DDP's default hook needs; this one reduces the bucket the same way and
    hands it back."""
    buffer = bucket.buffer()
    torch.distributed.all_reduce(buffer)
    done: torch.futures.Future = torch.futures.Future()
    done.set_result(buffer)
    return done


def weightless(cfg: DistillConfig) -> tuple[DistillConfig, list[str]]:
    """`cfg` with teachers that load nothing and students that start fresh; and what was changed."""
    from ...models import ZOO
    from ...teachers.presets import apply_preset
    from ..plan.spec import DEFAULT_PROXY

    notes, teachers = [], {}
    for name, spec in cfg.teachers.items():
        spec = apply_preset(name, spec)
        if spec.backend == "timm":
            teachers[name] = dataclasses.replace(spec, pretrained=False, checkpoint=None)
        elif spec.backend == "eupe":
            source = spec.checkpoint or spec.model
            folder = Path(source or "") / "config.json"
            if source in ZOO:
                model = source
            elif folder.is_file():
                saved = json.loads(folder.read_text())
                model, spec = saved["arch"], dataclasses.replace(spec, kwargs=saved.get("overrides") or {})
            else:
                model = DEFAULT_PROXY
                notes.append(f"teacher {name}: {source or '(unset)'} does not exist yet; sized as {model}")
            teachers[name] = dataclasses.replace(spec, model=model, checkpoint=None)
        else:
            raise ConfigError(
                f"--rehearse builds 'timm' and 'eupe' teachers; teachers.{name} is {spec.backend!r}"
            )
    students = {}
    for name, s in cfg.students.items():
        if s.init:
            notes.append(f"student {name}: init {s.init} not read (random weights, same shapes)")
        students[name] = dataclasses.replace(s, init=None, from_scratch=True)
    train = dataclasses.replace(cfg.train, device="cpu", compile=False, progress=False, tensorboard=False)
    if cfg.train.compile:
        notes.append("train.compile=true rehearsed eager (compiled graphs usually need less memory)")
    return dataclasses.replace(cfg, teachers=teachers, students=students, train=train), notes


# -- FLOPs --------------------------------------------------------------------------------------------
def _cpu_flash(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_flash_backward(g: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return sdpa_backward_flop_count(g, q, k, v)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU flash-attention kernel (the rehearsal's stand-in for
    the GPU's) with the same rule as the GPU kernels: 4*B*H*N*M*D forward, 2.5x that backward."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
        },
    )


# -- the rehearsal -------------------------------------------------------------------------------------
def rehearse(
    config: str,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    world: int,
    gpu: str = "h100-80gb",
    steps: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Rehearse `config` at `world` ranks; returns the figures (see docs/scale.md)."""
    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu!r} is not known; choose one of {', '.join(GPUS)}")
    if world < 1:
        raise ConfigError(f"--rehearse needs a world size >= 1; got {world}")
    if steps < 2:
        raise ConfigError(f"--steps must be >= 2 (the second step holds the optimizer state); got {steps}")
    start = time.perf_counter()
    planned = _plan(config, overrides, world)["total"] / GIB
    with fake_cluster(world) as mode:
        cfg = load_config(config, overrides)
        if cfg.data.teacher_cache:
            raise ConfigError(
                "--rehearse runs the live teachers; remove data.teacher_cache (a cached run needs less: "
                "no teacher weights or forward)"
            )
        cfg, notes = weightless(cfg)
        m = _measure(cfg, mode, steps, progress or (lambda _: None))
    split = {k: v / GIB for k, v in m["peak_split"].items()}
    split["other"] += OUTSIDE_TENSORS / GIB
    peak, memory = sum(split.values()), GPUS[gpu].memory / GIB
    return {
        "config": str(config),
        "world": world,
        "gpu": gpu,
        "gpu_label": GPUS[gpu].name,
        "gpu_memory_gib": memory,
        "fits": peak <= memory,
        "peak_gib": peak,
        "by_category_gib": {k: split[k] for k in CATEGORIES},
        "flops_per_image": m["flops_rank"] / (m["micro"] * cfg.train.accum_steps),
        "flops_per_step": m["flops_rank"] * world,
        "plan_peak_gib": planned,
        "plan_diff": abs(planned - peak) / peak,
        "untracked": [
            f"other += {OUTSIDE_TENSORS / GIB:.1f} GiB: CUDA context, NCCL buffers, cuBLAS/cuDNN workspaces "
            "(an allowance, not measured); allocator fragmentation not modelled"
        ],
        "micro_batch": m["micro"],
        "accum_steps": cfg.train.accum_steps,
        "global_batch": cfg.train.global_batch,
        "parallelism": m["parallelism"],
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "bf16": cfg.train.bf16,
        "steps": steps,
        "build_peak_gib": m["built"] / GIB,
        "notes": notes,
        "seconds": time.perf_counter() - start,
    }


def _measure(cfg: DistillConfig, mode: Any, steps: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Build the run on fake tensors, step it under the memory tracker, then count a step's FLOPs."""
    tracker = MemoryTracker()
    with tracker:
        say("building teachers and students on fake tensors")
        with HostConstants(mode):
            source = RehearsedTeachers(cfg, torch.device("cpu"), tracker)
            with tracker.phase("params"):
                d = RehearsedDistiller(cfg, source, tracker)
        _file_state(tracker, d, source)
        tracker.grads = lambda: _grads(d)
        built = tracker.peak
        tracker.reset_peak()
        for step in range(steps):
            say(f"step {step + 1}/{steps}")
            d.train_step()
    # FLOPs counted apart, after the memory steps: FlopCounterMode's module hooks keep checkpointed
    # activations alive across micro-batches, so memory is never measured under it. Stage 3: one
    # step per pyramid scale (student and teachers draw uniformly and independently from the same
    # scales, so the mean of these steps is the expected step).
    scales = sorted(set(cfg.pyramid)) if cfg.stage == "pyramid" else [max(cfg.pyramid)]
    flops = 0.0
    for side in scales:
        say(f"one more step at {side} px, counting FLOPs")
        d.sampler = FixedScale(side)
        counter = flop_counter()
        with counter:
            d.train_step()
        flops += counter.get_total_flops() / len(scales)
    return {
        "peak_split": tracker.peak_split,
        "built": built,
        "flops_rank": flops,
        "micro": d.micro,
        "parallelism": {
            n: ("fsdp" if s.sharded else "ddp" if s.runner is not None else "none")
            for n, s in d.students.items()
        },
    }


def _grads(d: Distiller | None) -> list[torch.Tensor]:
    """Every student gradient alive now: on the parameters (DDP, FSDP shards) and FSDP's unsharded
    ones (a block's before its reduce-scatter; all of them when accumulating without sync)."""
    if d is None:
        return []
    grads = [p.grad for s in d.students.values() for p in s.parameters() if p.grad is not None]
    for s in d.students.values():
        for m in s.runner.modules() if s.sharded else ():
            group = m._get_fsdp_state()._fsdp_param_group if hasattr(m, "_get_fsdp_state") else None
            for fp in group.fsdp_params if group is not None else ():
                unsharded = getattr(fp, "_unsharded_param", None)
                extra = [getattr(fp, "unsharded_accumulated_grad", None), getattr(unsharded, "grad", None)]
                grads += [g for g in extra if g is not None]
    return grads


def _file_state(tracker: MemoryTracker, d: Distiller, source: RehearsedTeachers) -> None:
    """Put the built state where it belongs, whatever phase allocated it."""
    for s in d.students.values():
        tracker.adopt(
            [*s.model.parameters(), *s.model.buffers(), *s.heads.parameters(), *s.heads.buffers()], "params"
        )
    for t in source.teachers.values():
        tracker.adopt([*t.parameters(), *t.buffers()], "teacher_weights")


def _plan(config: str, overrides: Any, world: int) -> dict[str, Any]:
    """`eupe plan`'s memory per GPU (bytes, by term) for the same config, world size, micro-batch and
    parallelism."""
    from ..plan import plan, spec_from_config

    with rank0_of(world):  # the config validates, and its micro-batch divides, as at `world` ranks
        cfg = load_config(config, overrides)
        micro = micro_batch(cfg)
    fsdp = any(uses_fsdp(cfg, s.name, world) for s in cfg.students.values())
    spec = spec_from_config(cfg, name=os.path.basename(str(config)))
    p = plan(spec, gpus=world, fsdp=fsdp, checkpointing=cfg.train.activation_checkpointing, micro_batch=micro)
    return p["memory"]["variants"][p["memory"]["chosen"]]
