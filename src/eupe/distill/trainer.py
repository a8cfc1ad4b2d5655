"""The distillation loop (all three stages), nanoGPT-style: read `Distiller.train` top to bottom.

    fetch batch -> teachers forward (no grad, each at its own resolution) -> TeacherNorm ->
    student forward -> adapter heads -> loss -> backward (x accum_steps) -> clip -> read the
    step's numbers (the one host sync) -> step -> log -> checkpoint

Everything else (building, measuring TeacherNorm, checkpoints, resume) is a small named helper.
A resumed run restores model, heads, optimizer, schedule, TeacherNorm, pyramid sampler, data
position and every rank's RNG, so on CPU it ends with exactly the weights of an uninterrupted run.

Under torchrun every rank starts from the same weights and then draws from its own seed (drop
path, RoPE jitter), and every rank stops together: divergence is read from the global gradient
norm, which all ranks share, and start-up errors on one rank are raised on all (`fail_together`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import CheckpointError, ConfigError, TrainingDiverged
from ..files import write_atomic_dir
from ..models.heads import TeacherHeads
from ..models.preprocess import Normalize
from ..models.teacher_norm import TeacherNorm
from ..runtime import (
    fail_together,
    host_values,
    init_distributed,
    pick_device,
    policy_device_type,
    rank_seed,
    seed_everything,
    shutdown,
)
from . import checkpoint as ckpt
from .config import DistillConfig, check_paths, load_config, micro_batch, student_resolutions, to_yaml
from .family import build_students
from .loss import LossWeights, teacher_loss, total_loss
from .parallel import (
    DCP_DIR,
    as_local_norm,
    forward_student,
    full_state,
    grad_sync,
    load_sharded,
    read_step,
    save_sharded,
    synced_by_wrapper,
    wrap_student,
)
from .stages import ScaleSampler, StudentState, build_student, draw_resolutions, prepare_student
from .targets import TargetSource, targets_from_config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"


class Distiller:
    """One distillation run writing to `cfg.output_dir` (fresh, or resumed from its checkpoints).

    `source` says where teacher targets come from (`distill/targets.py`); by default the config's
    live teachers, or its teacher cache when `data.teacher_cache` is set.
    """

    def __init__(self, cfg: DistillConfig, *, resume: bool = False, source: TargetSource | None = None):
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        check_paths(cfg)
        # cuda:<LOCAL_RANK>, current before any CUDA work
        self.device = pick_device(cfg.train.device, setting="train.device", tf32=True)
        self.rank, self.world = init_distributed(self.device, cfg.train.dist_timeout_s)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.seed)  # the same weights on every rank ...
        self.source = source or targets_from_config(cfg, self.device)
        dims = self.source.dims
        # students: name -> StudentState (one, or a family sharing each teacher forward)
        own_seed = rank_seed(cfg.seed, self.rank)
        self.students, self.streams = build_students(cfg, dims, self.device, own_seed)
        seed_everything(own_seed)  # ... then each rank its own random draws
        for name, spec in cfg.students.items():
            wrap_student(self.students[name], cfg, spec, self.device, self.world)
        self.norm = self.source.norm.to(self.device)  # saved in checkpoints; restored on resume
        self.normalize = Normalize().to(self.device)  # the students' input constants, on the device
        self.weights = {
            n: LossWeights(
                cfg.distill.alpha, cfg.distill.beta, s.weight, s.patch_weight, cfg.distill.smooth_l1_beta
            )
            for n, s in cfg.teachers.items()
        }
        self.sampler = ScaleSampler(cfg.pyramid, cfg.seed + 1)
        self.micro = micro_batch(cfg)
        self.loader = self.source.loader(
            cfg.data,
            self.micro,
            self.view_size(),
            cfg.seed,
            self.rank,
            self.world,
            self.device,
            cfg.train.accum_steps,
        )
        self._setup_checkpointing()
        self.step = 0
        if resume:
            self._resume()
        else:
            with fail_together(self.world):
                self._start()
        self._batches = iter(self.loader)
        self._writer = None

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> Path:
        """Run to `train.max_steps`, then write `final/`; returns the final folder."""
        t = self.cfg.train
        self.prepare()
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not t.progress or self.rank,
            unit="step",
            desc=self.out.name,
        )
        self._window = (0, time.perf_counter())  # (images, start time) since the last log line
        self._writer = self._tensorboard()
        try:
            while self.step < t.max_steps:
                row = self.train_step()
                if row is not None:
                    bar.set_postfix(
                        loss=f"{row.get('loss', math.nan):.4f}", img_s=f"{row['images_per_s']:.1f}"
                    )
                bar.update(1)
                if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                    self.save_checkpoint()
            self.finish_checkpoint()
        finally:
            bar.close()
            if self._writer is not None:
                self._writer.close()
        self._report_skipped()
        return self.save_final()

    def train_step(self) -> dict | None:
        """One optimizer step of every student over `train.accum_steps` micro-batches; returns the
        metrics row on logging steps. The CPU reads from the device once: `read_step`."""
        cfg, t = self.cfg, self.cfg.train
        teacher_res, student_res = draw_resolutions(cfg, self.sampler, [*self.source.dims], [*self.students])
        lrs = {n: s.schedule.current_lr for n, s in self.students.items()}
        logging = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.max_steps
        sums: dict[str, torch.Tensor] = {}  # this rank's means over its micro-batches, on the device
        for micro in range(t.accum_steps):
            batch = self._next_batch()
            views = batch.views
            targets = self.source.targets(batch, teacher_res)  # frozen, normalized
            for name, s in self.students.items():  # each on its own RNG stream
                with (
                    self.streams.use(name),
                    grad_sync(s, micro == t.accum_steps - 1, t.fsdp_reduce_every_micro),
                ):
                    loss, terms = self.student_loss(s, views, targets, student_res[name])
                    (loss / t.accum_steps).backward()
                for k, v in {"loss": loss.detach(), **terms}.items():
                    key = self._key(name, k)
                    sums[key] = sums.get(key, 0.0) + v / t.accum_steps
            self._count_images(views.shape[0] * self.world)
        norms = {self._key(n, "grad_norm"): self.clip_gradients(s) for n, s in self.students.items()}
        norms, logged = read_step(norms, sums if logging else {}, self.world)  # the step's one sync
        if not all(math.isfinite(v) for v in norms.values()):  # the same on every rank
            self._diverged(norms, sums)
        for s in self.students.values():
            self.optimizer_step(s)
        self.step += 1
        if not logging:
            return None
        logged.update(norms)
        if cfg.stage == "pyramid":  # the scales this iteration drew
            logged.update({f"resolution/{n}": r for n, r in {**student_res, **teacher_res}.items()})
        return self._log(logged, lrs)

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
    def student_loss(
        self, s: StudentState, views: torch.Tensor, targets: dict, resolution: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student forward at `resolution`, every teacher's head and loss terms."""
        images = prepare_student(views, resolution, self.normalize)
        if s.model.family == "convnext" and policy_device_type(self.device) == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16):
            out, projected = forward_student(s, images, list(targets))
            per_teacher = {}
            for name, y in targets.items():
                z_cls, z_patch = projected[name]
                per_teacher[name] = teacher_loss(
                    z_cls, z_patch, out.grid, y.cls, y.patches, y.grid, self.weights[name]
                )
        return total_loss(per_teacher)

    def clip_gradients(self, s: StudentState) -> torch.Tensor:
        """Average gradients over processes (unless DDP/FSDP did), clip; returns the global norm."""
        params = [p for p in s.parameters() if p.grad is not None]
        if self.world > 1 and not synced_by_wrapper(s):
            for p in params:  # SUM then divide: gloo (CPU) has no AVG
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.world)
        clip = self.cfg.train.clip_grad
        return as_local_norm(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))

    def optimizer_step(self, s: StudentState) -> None:
        """Step the optimizer and advance the schedule."""
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.schedule.step()

    def _diverged(self, norms: dict[str, float], sums: dict[str, torch.Tensor]) -> None:
        """Every rank gets here at the same step (the norms are global); stop before the update."""
        self.finish_checkpoint()  # a checkpoint still being written is good: complete it
        bad = ", ".join(f"{k}={v}" for k, v in norms.items() if not math.isfinite(v))
        keys = sorted(sums)
        values = host_values(torch.stack([torch.as_tensor(sums[k]).double() for k in keys])) if keys else []
        terms = ", ".join(f"{k}={v}" for k, v in zip(keys, values) if not math.isfinite(v))
        where = f"; non-finite loss terms on rank {self.rank}: {terms}" if terms else ""
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: {bad}{where}; stopped before the optimizer "
            f"step. {self._last_good()} Lower train.lr, check the data and teacher outputs, or try "
            "train.bf16=false."
        )

    def _last_good(self) -> str:
        found = ckpt.list_checkpoints(self.out)
        if not found:
            return "No checkpoint was written yet."
        return f"Last good checkpoint: {found[-1][1]} (resume with `eupe distill --resume {self.out}`)."

    def _next_batch(self):
        """The source's next batch, its views moved to the training device."""
        try:
            batch = next(self._batches)
        except StopIteration:  # a finite loader: start its next pass
            self._batches = iter(self.loader)
            batch = next(self._batches)
        batch.views = batch.views.to(self.device, non_blocking=True)
        return batch

    # -- setup -------------------------------------------------------------------------------
    def view_size(self) -> int:
        """Side of the shared augmented view: the largest input any network needs."""
        sizes = [*student_resolutions(self.cfg), *self.source.sides.values()]
        if self.cfg.stage == "pyramid":
            sizes += list(self.cfg.pyramid)
        return max(sizes)

    def _start(self) -> None:
        """A fresh run: the output folder must not hold another run (rank 0 checks and writes; the
        caller raises its error on every rank)."""
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

    def prepare(self) -> None:
        """Before the first step: TeacherNorm over the first `norm.batches` optimizer steps of data
        (each `accum_steps` micro-batches), where the source still needs it; then it is fixed."""
        n = self.cfg.norm.batches * self.cfg.train.accum_steps
        self.source.prepare(self._next_batch, n, self.cfg.train.progress and not self.rank)

    # -- checkpoints ---------------------------------------------------------------------------
    def _setup_checkpointing(self) -> None:
        sharded = any(s.sharded for s in self.students.values())
        self._async = sharded and self.cfg.train.async_checkpoint
        # background DCP writes run their collectives on a gloo group of their own, never on the
        # training group (NCCL, or gloo busy with this step's all-reduces)
        self._ckpt_group = torch.distributed.new_group(backend="gloo") if self._async else None
        self._pending: tuple[Path, list] | None = None

    def save_checkpoint(self) -> None:
        """checkpoints/step_<N>/: every rank writes its parts in place; `finish_checkpoint` commits."""
        self.finish_checkpoint()  # the previous checkpoint, if still being written
        path = ckpt.checkpoint_dir(self.out, self.step)
        if not self.rank and path.exists():  # left incomplete by a killed run: rewrite it whole
            shutil.rmtree(path)
        self._barrier()
        writes = []
        for name, s in self.students.items():
            folder = path / "students" / name
            if s.sharded:  # every rank its DCP shards
                writes.append(save_sharded(s, folder / DCP_DIR, self._ckpt_group, self._async))
                if not self.rank:
                    folder.mkdir(parents=True, exist_ok=True)
                    ckpt.save_state(folder, "schedule", s.schedule.state_dict())
            elif not self.rank:
                s.save(folder)
        rng = path / "rng"
        rng.mkdir(parents=True, exist_ok=True)
        ckpt.save_state(
            rng, f"rank_{self.rank}", {"global": ckpt.rng_state(), "students": self.streams.state_dict()}
        )
        if not self.rank:
            self.norm.save(path)
            ckpt.save_json(
                path / "trainer.json",
                {
                    "step": self.step,
                    "world": self.world,
                    "students": list(self.students),
                    "loader": self.loader.state_dict(),
                    "sampler": self.sampler.state_dict(),
                },
            )
        self._pending = (path, [w for w in writes if w is not None])
        if not self._pending[1]:
            self.finish_checkpoint()

    def finish_checkpoint(self) -> None:
        """Wait for the pending checkpoint's background writes, then commit it (collective)."""
        if self._pending is None:
            return
        path, writes = self._pending
        self._pending = None
        for w in writes:
            w.result()
        self._barrier()
        if not self.rank:
            ckpt.commit(path)
            ckpt.prune_checkpoints(self.out, self.cfg.train.keep_checkpoints)

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _resume(self) -> None:
        """Load the newest complete checkpoint; none yet means a fresh (deterministic) start."""
        with fail_together(self.world):
            if not (self.out / CONFIG_FILE).is_file():
                raise CheckpointError(f"{self.out}: no {CONFIG_FILE}; not a distill output_dir")
            found = ckpt.list_checkpoints(self.out)
            state = ckpt.load_json(found[-1][1] / "trainer.json") if found else None
            if state is not None and state["students"] != list(self.students):
                raise CheckpointError(
                    f"{found[-1][1]}: students {state['students']} differ from the config's"
                )
        if not found:
            if not self.rank:
                ckpt.truncate_metrics(self.out / METRICS_FILE, 0)
            return
        self.step, path = found[-1]
        for name, s in self.students.items():
            if (path / "students" / name / DCP_DIR).is_dir():  # written by FSDP; any world size
                load_sharded(s, path / "students" / name / DCP_DIR)
                s.schedule.load_state_dict(ckpt.load_state(path / "students" / name, "schedule"))
            else:
                s.load(path / "students" / name)
        norm = TeacherNorm.load(path)
        self.norm.load_state_dict(norm.state_dict(), strict=True)
        self.loader.load_state_dict(state["loader"])
        self.sampler.load_state_dict(state["sampler"])
        self._restore_rng(path, int(state.get("world", 1)))
        if not self.rank:
            ckpt.truncate_metrics(self.out / METRICS_FILE, self.step)

    def _restore_rng(self, path: Path, saved_world: int) -> None:
        """This rank's RNG as saved; on another world size (no state saved for this rank) each rank
        draws anew from a seed of (seed, step, rank): data order continues exactly, random draws
        inside the models do not."""
        own = path / "rng" / f"rank_{self.rank}.json"
        if saved_world == self.world and own.is_file():
            state = ckpt.load_state(path / "rng", f"rank_{self.rank}")
            ckpt.set_rng_state(state["global"])
            self.streams.load_state_dict(state["students"])
        elif saved_world == self.world and (path / "rng.json").is_file():  # written before per-rank RNG
            ckpt.set_rng_state(ckpt.load_state(path, "rng"))
            if (path / "student_rng.json").is_file():
                self.streams.load_state_dict(ckpt.load_state(path, "student_rng"))
        else:
            seed_everything(rank_seed(self.cfg.seed + self.step, self.rank))
            for name in self.streams.states:
                self.streams.states[name] = self.streams.capture()
            if not self.rank:
                print(
                    f"resume: saved on {saved_world} process(es), resumed on {self.world}: the data "
                    "order continues exactly; random draws in the models start from new seeds",
                    file=sys.stderr,
                )

    def save_final(self) -> Path:
        """final/ (family runs: final/<student>/): the student (save_pretrained), its heads and the
        TeacherNorm statistics."""
        target = self.out / FINAL_DIR
        specs = self.cfg.students
        gathered = {  # FSDP students: gather the full weights (collective), saved by rank 0
            n: full_state(s.runner) for n, s in self.students.items() if s.sharded
        }
        if self.rank:
            return target

        def fill_one(tmp: Path, name: str, s: StudentState) -> None:
            model, heads = s.model, s.heads
            if name in gathered:  # built without memory, then given the gathered tensors
                # own storage per tensor: gathered ones may be views of one buffer (safetensors refuses)
                state = {
                    k: v.clone() if v.untyped_storage().nbytes() > v.nbytes else v
                    for k, v in gathered[name].items()
                }
                spec = dataclasses.replace(specs[name], init=None, mimetic_init=False)
                model = build_student(spec, "meta")
                model.load_state_dict(
                    {k[6:]: v for k, v in state.items() if k.startswith("model.")}, assign=True
                )
                with torch.device("meta"):
                    heads = TeacherHeads(s.heads.student_dim, s.heads.teacher_dims, s.heads.hidden_dim)
                heads.load_state_dict(
                    {k[6:]: v for k, v in state.items() if k.startswith("heads.")}, assign=True
                )
            model.save_pretrained(tmp)
            heads.save(tmp)
            self.norm.save(tmp)
            ckpt.save_json(tmp / "distill.json", {"step": self.step, "teachers": list(self.source.dims)})

        if len(self.students) == 1:
            ((name, s),) = self.students.items()
            return write_atomic_dir(target, lambda tmp: fill_one(tmp, name, s))

        def fill(tmp: Path) -> None:
            for name, s in self.students.items():
                (tmp / name).mkdir()
                fill_one(tmp / name, name, s)

        return write_atomic_dir(target, fill)

    # -- logging -------------------------------------------------------------------------------
    def _log(self, logged: dict[str, float], lrs: dict[str, float]) -> dict:
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
        if self._writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._writer.add_scalar(k, v, self.step)
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
    final = Distiller(cfg).train()
    shutdown()
    return final


def _rederived_accum(config: Path) -> list[str]:
    from omegaconf import OmegaConf

    micro = OmegaConf.select(OmegaConf.load(config), "train.micro_batch", default=0)
    return ["train.accum_steps=1"] if micro and int(micro) > 0 else []


def resume(output_dir: str | Path) -> Path:
    """Continue the run in `output_dir` from its newest checkpoint; returns `output_dir/final`."""
    out = Path(output_dir)
    if not (out / CONFIG_FILE).is_file():
        raise CheckpointError(f"{out}: no {CONFIG_FILE}; --resume takes the output_dir of an earlier run")
    # with train.micro_batch, accum_steps is re-derived for this world size (it may differ from the saved one)
    cfg = load_config(out / CONFIG_FILE, [f"output_dir={out}", *_rederived_accum(out / CONFIG_FILE)])
    found = ckpt.list_checkpoints(out)
    if found and found[-1][0] >= cfg.train.max_steps and (out / FINAL_DIR / "config.json").is_file():
        print(f"{out}: already complete at step {found[-1][0]}", file=sys.stderr)
        return out / FINAL_DIR
    final = Distiller(cfg, resume=True).train()
    shutdown()
    return final
