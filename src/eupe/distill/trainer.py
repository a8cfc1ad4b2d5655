"""The distillation loop (all three stages), nanoGPT-style: read `Distiller.train` top to bottom.

    fetch batch -> teachers forward (no grad, each at its own resolution) -> TeacherNorm ->
    student forward -> adapter heads -> loss -> backward (x accum_steps) -> clip, step ->
    log -> checkpoint

Everything else (building, measuring TeacherNorm, checkpoints, resume) is a small named helper.
A resumed run restores model, heads, optimizer, schedule, TeacherNorm, pyramid sampler, data
position and every RNG, so on CPU it ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data import build_loader
from ..errors import CheckpointError, ConfigError, EupeError
from ..teachers import build_teacher_from_spec
from . import checkpoint as ckpt
from .config import (
    DistillConfig,
    check_paths,
    load_config,
    micro_batch,
    student_resolutions,
    to_yaml,
    world_size,
)
from .family import build_students, student_specs
from .loss import LossWeights, teacher_loss, total_loss
from .norm import TeacherNorm
from .parallel import (
    DCP_DIR,
    as_local_norm,
    forward_student,
    full_state,
    grad_sync,
    load_sharded,
    reduce_mean,
    save_sharded,
    synced_by_wrapper,
    wrap_student,
)
from .stages import ScaleSampler, StudentState, build_student, draw_resolutions, prepare_student

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"


class TrainingDiverged(EupeError):
    """The loss or the gradients became NaN/inf; the run stopped before touching its checkpoints."""


class Distiller:
    """One distillation run writing to `cfg.output_dir` (fresh, or resumed from its checkpoints)."""

    def __init__(self, cfg: DistillConfig, resume: bool = False):
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        check_paths(cfg)
        self.rank, self.world = _init_distributed()
        self.device = _pick_device(cfg.train.device, self.rank)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        _seed_everything(cfg.seed)
        self.cache = None  # a teacher-feature cache replaces the teachers (data.teacher_cache)
        if cfg.data.teacher_cache:
            from .cache import TeacherCache

            self.cache = TeacherCache(cfg.data.teacher_cache)
            self.teachers = self.cache.stub_teachers(cfg)
        else:
            self.teachers = self._build_teachers()
        dims = {n: (t.cls_dim, t.patch_dim) for n, t in self.teachers.items()}
        # students: name -> StudentState (one, or a family sharing each teacher forward)
        self.students, self.streams = build_students(cfg, dims, self.device)
        for name, spec in student_specs(cfg).items():
            wrap_student(self.students[name], cfg, spec, self.device, self.world)
        self.norm = TeacherNorm(dims).to(self.device)
        if self.cache is not None:  # the statistics the cache's targets were normalized with
            self.norm.load_state_dict(self.cache.norm.state_dict())
        self.weights = {
            n: LossWeights(
                cfg.distill.alpha, cfg.distill.beta, s.weight, s.patch_weight, cfg.distill.smooth_l1_beta
            )
            for n, s in cfg.teachers.items()
        }
        self.sampler = ScaleSampler(cfg.pyramid, cfg.seed + 1)
        self.micro = micro_batch(cfg)
        self._cached_targets = None
        self.loader = (
            build_loader(
                cfg.data,
                batch_size=self.micro,
                view_size=self.view_size(),
                seed=cfg.seed,
                rank=self.rank,
                world_size=self.world,
            )
            if self.cache is None
            else self.cache.loader(cfg.data, self.micro, self.view_size(), cfg.seed, self.rank, self.world)
        )
        self.step = 0
        if resume:
            self._resume()
        else:
            self._start()
        self._batches = iter(self.loader)

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> Path:
        """Run to `train.max_steps`, then write `final/`; returns the final folder."""
        cfg, t = self.cfg, self.cfg.train
        self._measure_norm_if_needed()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not t.progress or self.rank, unit="step")
        self._window = (0, time.perf_counter())  # (images, start time) since the last log line
        writer = self._tensorboard()
        try:
            while self.step < t.max_steps:
                teacher_res, student_res = draw_resolutions(
                    cfg, self.sampler, [*self.teachers], [*self.students]
                )
                lrs = {n: s.schedule.current_lr for n, s in self.students.items()}
                logged: dict[str, float] = {}
                for micro in range(t.accum_steps):
                    views = self._next_batch()
                    targets = self.teacher_targets(views, teacher_res)  # frozen, normalized
                    for name, s in self.students.items():  # each on its own RNG stream
                        with self.streams.use(name), grad_sync(s, micro == t.accum_steps - 1):
                            loss, terms = self.student_loss(s, views, targets, student_res[name])
                            self._check_finite(loss, terms)
                            (loss / t.accum_steps).backward()
                        for k, v in {"loss": float(loss.detach()), **terms}.items():
                            key = self._key(name, k)
                            logged[key] = logged.get(key, 0.0) + v / t.accum_steps
                    self._count_images(views.shape[0] * self.world)
                logged = reduce_mean(logged, self.world)  # the mean over the global batch
                for name, s in self.students.items():
                    logged[self._key(name, "grad_norm")] = self.optimizer_step(s)
                self.step += 1

                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    if cfg.stage == "pyramid":  # the scales this iteration drew
                        logged.update(
                            {f"resolution/{n}": r for n, r in {**student_res, **teacher_res}.items()}
                        )
                    row = self._log(logged, lrs, writer)
                    bar.set_postfix(
                        loss=f"{row.get('loss', math.nan):.4f}", img_s=f"{row['images_per_s']:.1f}"
                    )
                bar.update(1)
                if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        self._report_skipped()
        return self.save_final()

    def _key(self, student: str, name: str) -> str:
        """Metric name; with several students each gets a `<student>/` prefix."""
        return name if len(self.students) == 1 else f"{student}/{name}"

    def _count_images(self, n: int) -> None:
        self._window = (self._window[0] + n, self._window[1])

    def _report_skipped(self) -> None:
        stats = self.loader.stats()
        if stats["skipped"] and not self.rank:
            shown = "; ".join(f"{e['file']}: {e['reason']}" for e in stats["examples"][:3])
            print(f"data: skipped {stats['skipped']} unreadable file(s), e.g. {shown}", file=sys.stderr)

    # -- one step's parts ---------------------------------------------------------------------
    def teacher_targets(self, views: torch.Tensor, resolutions: dict[str, int | None]) -> dict:
        """Normalized teacher outputs; each teacher resizes the shared view to its own resolution."""
        if self._cached_targets is not None:  # read from the teacher-feature cache, already normalized
            from .cache import targets_to

            return targets_to(self._cached_targets, self.device)
        targets = {}
        for name, teacher in self.teachers.items():
            out = teacher(views, resolutions[name])
            with torch.no_grad():
                targets[name] = self.norm.normalize(name, out)  # normal tensors, not inference ones
        return targets

    def student_loss(
        self, s: StudentState, views: torch.Tensor, targets: dict, resolution: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Student forward at `resolution`, every teacher's head and loss terms."""
        images = prepare_student(views, resolution)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16):
            out, projected = forward_student(s, images, list(targets))
            per_teacher = {}
            for name, y in targets.items():
                z_cls, z_patch = projected[name]
                per_teacher[name] = teacher_loss(
                    z_cls, z_patch, out.grid, y.cls, y.patches, y.grid, self.weights[name]
                )
        return total_loss(per_teacher)

    def optimizer_step(self, s: StudentState) -> float:
        """Average gradients over processes, clip, step, advance the schedule; returns the grad norm."""
        params = [p for p in s.parameters() if p.grad is not None]
        if self.world > 1 and not synced_by_wrapper(s):  # DDP/FSDP averaged in backward
            for p in params:  # SUM then divide: gloo (CPU) has no AVG
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.world)
        clip = self.cfg.train.clip_grad
        norm = as_local_norm(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
        if not torch.isfinite(norm):
            raise TrainingDiverged(
                f"gradient norm is {float(norm)} at step {self.step + 1}; stopped before the optimizer "
                f"step. {self._last_good()} Lower train.lr or enable train.clip_grad."
            )
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.schedule.step()
        return float(norm)

    def _check_finite(self, loss: torch.Tensor, terms: dict[str, float]) -> None:
        if torch.isfinite(loss):
            return
        bad = ", ".join(f"{k}={v}" for k, v in terms.items() if not math.isfinite(v))
        raise TrainingDiverged(
            f"loss is {float(loss.detach())} at step {self.step + 1} ({bad}); stopped. {self._last_good()} "
            "Lower train.lr, check the data and teacher outputs, or try train.bf16=false."
        )

    def _last_good(self) -> str:
        found = ckpt.list_checkpoints(self.out)
        if not found:
            return "No checkpoint was written yet."
        return f"Last good checkpoint: {found[-1][1]} (resume with `eupe distill --resume {self.out}`)."

    def _next_batch(self) -> torch.Tensor:
        try:
            batch = next(self._batches)
        except StopIteration:  # a finite loader: start its next pass
            self._batches = iter(self.loader)
            batch = next(self._batches)
        self._cached_targets = getattr(batch, "targets", None)
        return batch.views.to(self.device, non_blocking=True)

    # -- setup -------------------------------------------------------------------------------
    def view_size(self) -> int:
        """Side of the shared augmented view: the largest input any network needs."""
        sizes = [*student_resolutions(self.cfg), *(t.resolution for t in self.teachers.values())]
        if self.cfg.stage == "pyramid":
            sizes += list(self.cfg.pyramid)
        return max(sizes)

    def _build_teachers(self) -> dict:
        teachers = {}
        for name, spec in self.cfg.teachers.items():
            # built in place on the device (no 7B teacher in CPU memory); errors name teachers.<name>
            teacher = build_teacher_from_spec(name, spec, seed=self.cfg.seed, device=self.device)
            teachers[name] = teacher.to(self.device).eval().requires_grad_(False)
            if self.cfg.stage == "pyramid":
                for r in self.cfg.pyramid:
                    if r % teacher.stride:
                        raise ConfigError(
                            f"pyramid: scale {r} is not a multiple of teacher {name!r}'s patch size "
                            f"{teacher.stride}; pick scales that both the student and the teachers divide"
                        )
        return teachers

    def _start(self) -> None:
        """A fresh run: the output folder must not hold another run."""
        if self.rank:
            return
        if (self.out / METRICS_FILE).exists() or ckpt.list_checkpoints(self.out):
            raise ConfigError(
                f"output_dir={str(self.out)!r} already holds a run; continue it with "
                f"`eupe distill --resume {self.out}` or choose another output_dir"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / CONFIG_FILE).write_text(to_yaml(self.cfg))
        (self.out / METRICS_FILE).write_text("")

    def _measure_norm_if_needed(self) -> None:
        """TeacherNorm over the first `norm.batches` batches at native resolution, then frozen."""
        if bool(self.norm.frozen):
            return
        n = self.cfg.norm.batches
        for _ in tqdm(range(n), desc="TeacherNorm", disable=not self.cfg.train.progress or self.rank):
            views = self._next_batch()
            for name, teacher in self.teachers.items():
                self.norm.observe(name, teacher(views))
        if self.world > 1:
            for name, buf in self.norm.named_buffers():
                if name.endswith(("_sum", "_sumsq", "_count")):
                    torch.distributed.all_reduce(buf)
        self.norm.freeze()

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """checkpoints/step_<N>/ (atomic), then prune to the newest train.keep_checkpoints."""
        sharded = self._save_sharded_parts()  # FSDP students: every rank writes its DCP shards
        if self.rank:
            return None

        def fill(tmp: Path) -> None:
            for name, s in self.students.items():
                if name in sharded:
                    (tmp / "students" / name).mkdir(parents=True)
                    sharded[name].rename(tmp / "students" / name / DCP_DIR)
                    ckpt.save_state(tmp / "students" / name, "schedule", s.schedule.state_dict())
                else:
                    s.save(tmp / "students" / name)
            self.norm.save(tmp)
            ckpt.save_state(tmp, "rng", ckpt.rng_state())
            ckpt.save_state(tmp, "student_rng", self.streams.state_dict())
            ckpt.save_json(
                tmp / "trainer.json",
                {
                    "step": self.step,
                    "students": list(self.students),
                    "loader": self.loader.state_dict(),
                    "sampler": self.sampler.state_dict(),
                },
            )

        path = ckpt.write_atomic_dir(ckpt.checkpoint_dir(self.out, self.step), fill)
        if sharded:  # the emptied side folder of the DCP shards
            next(iter(sharded.values())).parent.rmdir()
        ckpt.prune_checkpoints(self.out, self.cfg.train.keep_checkpoints)
        return path

    def _resume(self) -> None:
        """Load the newest complete checkpoint; none yet means a fresh (deterministic) start."""
        if not (self.out / CONFIG_FILE).is_file():
            raise CheckpointError(f"{self.out}: no {CONFIG_FILE}; not a distill output_dir")
        found = ckpt.list_checkpoints(self.out)
        if not found:
            ckpt.truncate_metrics(self.out / METRICS_FILE, 0)
            return
        self.step, path = found[-1]
        state = ckpt.load_json(path / "trainer.json")
        if state["students"] != list(self.students):
            raise CheckpointError(f"{path}: students {state['students']} differ from the config's")
        for name, s in self.students.items():
            if (path / "students" / name / DCP_DIR).is_dir():  # written by FSDP; any world size
                load_sharded(s, path / "students" / name / DCP_DIR)
                s.schedule.load_state_dict(ckpt.load_state(path / "students" / name, "schedule"))
            else:
                s.load(path / "students" / name)
        if (path / "student_rng.json").is_file():
            self.streams.load_state_dict(ckpt.load_state(path, "student_rng"))
        norm = TeacherNorm.load(path)
        self.norm.load_state_dict(norm.state_dict(), strict=True)
        self.loader.load_state_dict(state["loader"])
        self.sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(ckpt.load_state(path, "rng"))
        if not self.rank:
            ckpt.truncate_metrics(self.out / METRICS_FILE, self.step)

    def save_final(self) -> Path:
        """final/ (family runs: final/<student>/): the student (save_pretrained), its heads and the
        TeacherNorm statistics."""
        target = self.out / FINAL_DIR
        specs = student_specs(self.cfg)
        gathered = {  # FSDP students: gather the full weights (collective), saved by rank 0
            n: full_state(s.runner) for n, s in self.students.items() if getattr(s, "sharded", False)
        }
        if self.rank:
            return target

        def fill_one(tmp: Path, name: str, s: StudentState) -> None:
            model, heads = s.model, s.heads
            if name in gathered:  # an unsharded copy of the student to write
                model = build_student(dataclasses.replace(specs[name], init=None), "cpu")
                model.load_state_dict({k[6:]: v for k, v in gathered[name].items() if k.startswith("model.")})
                heads = type(s.heads)(s.heads.student_dim, s.heads.teacher_dims, s.heads.hidden_dim)
                heads.load_state_dict({k[6:]: v for k, v in gathered[name].items() if k.startswith("heads.")})
            model.save_pretrained(tmp)
            heads.save(tmp)
            self.norm.save(tmp)
            ckpt.save_json(tmp / "distill.json", {"step": self.step, "teachers": list(self.teachers)})

        if len(self.students) == 1:
            ((name, s),) = self.students.items()
            return ckpt.write_atomic_dir(target, lambda tmp: fill_one(tmp, name, s))

        def fill(tmp: Path) -> None:
            for name, s in self.students.items():
                (tmp / name).mkdir()
                fill_one(tmp / name, name, s)

        return ckpt.write_atomic_dir(target, fill)

    def _save_sharded_parts(self) -> dict[str, Path]:
        """DCP shards of every FSDP student in a side folder (collective); rank 0 moves them in."""
        parts = {}
        for name, s in self.students.items():
            if getattr(s, "sharded", False):
                side = self.out / ckpt.CHECKPOINTS / f".dcp-step_{self.step}" / name
                save_sharded(s, side)
                parts[name] = side
        if parts:
            torch.distributed.barrier()
        return parts

    # -- logging -------------------------------------------------------------------------------
    def _log(self, logged: dict[str, float], lrs: dict[str, float], writer) -> dict:
        """Append one metrics.jsonl line (and TensorBoard scalars); returns the row."""
        images, since = self._window
        now = time.perf_counter()
        self._window = (0, now)
        row = {"step": self.step, "lr": next(iter(lrs.values())) if len(lrs) == 1 else lrs, **logged}
        row["images_per_s"] = images / max(now - since, 1e-9)
        row["data/skipped"] = self.loader.stats()["skipped"]  # unreadable files so far
        if self.rank:
            return row
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, self.step)
        return row

    def _tensorboard(self):
        if not self.cfg.train.tensorboard or self.rank:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "train.tensorboard=true needs the tensorboard package: pip install tensorboard"
            ) from None
        return SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1)


# -- entry points ----------------------------------------------------------------------------------
def distill(cfg: DistillConfig) -> Path:
    """Train a fresh run; returns `output_dir/final`."""
    return Distiller(cfg).train()


def resume(output_dir: str | Path) -> Path:
    """Continue the run in `output_dir` from its newest checkpoint; returns `output_dir/final`."""
    out = Path(output_dir)
    if not (out / CONFIG_FILE).is_file():
        raise CheckpointError(f"{out}: no {CONFIG_FILE}; --resume takes the output_dir of an earlier run")
    cfg = load_config(out / CONFIG_FILE, [f"output_dir={out}"])
    found = ckpt.list_checkpoints(out)
    if found and found[-1][0] >= cfg.train.max_steps and (out / FINAL_DIR / "config.json").is_file():
        print(f"{out}: already complete at step {found[-1][0]}", file=sys.stderr)
        return out / FINAL_DIR
    return Distiller(cfg, resume=True).train()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _pick_device(name: str, rank: int) -> torch.device:
    if name == "auto":
        return torch.device(
            f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
        )
    return torch.device(name)


def _init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    ws = world_size()
    if ws == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), ws


def distill_from_cli(config: str | None, overrides: list[str], resume_dir: str | None) -> Path:
    """`eupe distill CONFIG [key=value ...]` or `eupe distill --resume OUTPUT_DIR`."""
    if resume_dir:
        if config or overrides:
            extra = " ".join([*([config] if config else []), *overrides])
            raise ConfigError(
                f"--resume reuses the run's own config.yaml and takes no config or overrides (got: {extra})"
            )
        return resume(resume_dir)
    if not config:
        raise ConfigError("give a CONFIG file (e.g. configs/tiny/stage1.yaml) or --resume OUTPUT_DIR")
    if "=" in config and not Path(config).exists():
        raise ConfigError(f"the first argument is the config file; got the override {config!r}")
    return distill(load_config(config, overrides))
