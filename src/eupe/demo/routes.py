"""The demo's two routes to a student, for several seeds and budgets, on both cores.

    eupe route    Stage 2 (the proxy's precomputed targets, one side) -> Stage 3 (multi-resolution,
                  the proxy live), the proxy trained once by Stage 1 and shared by every run
    direct route  the experts' precomputed targets -> the same student: paper Table 2's "Stage 2 only",
                  with exactly Stage 2 + Stage 3's student steps and images

A `Run` is one route for one seed at one budget. Its stages are ordinary trainer run folders under
<output-dir>/<run.folder>/ (`stage2/`, `stage3/` or `direct/`), and its scores and CPU seconds go
to <run.folder>/<route>.json. Every stage's seed is its config's seed plus `SEED_STRIDE` x the run's
seed index, and every stage's `train.max_steps` is multiplied by the run's budget.

Two processes share the work (`run_in_child` forks the second): the first trains the proxy, the
second the direct runs; then both take EUPE runs, each claimed by one process (`claim`). Every
process is single-threaded and every stage seeds itself, so who runs what cannot change a result,
and fork shares the views, targets and benchmark sets copy-on-write.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..distill.targets import PrecomputedTargets
from ..distill.trainer import Distiller
from ..errors import EupeError
from ..models import create_model
from ..models.encoder import EncoderOutput

ROUTES = {"eupe": ("stage2", "stage3"), "direct": ("direct",)}
SEED_STRIDE = 100


@dataclass(frozen=True)
class Run:
    route: str  # "eupe" or "direct"
    seed: int  # seed index k
    budget: int = 1  # multiplier of every stage's train.max_steps
    folder: str = ""  # "seed_<k>", "sweep/x<budget>/seed_<k>" or "sweep/proxy_<p>/seed_<k>"
    proxy: str = ""  # the EUPE route's proxy: "" the finished one, else a build checkpoint ("1_8", ...)
    lr: float = 0.0  # `eupe demo --search`: the student stages' peak lr (0: the config's)
    head: int = 0  # `eupe demo --search`: the adapter heads' hidden width (0: the config's)

    @property
    def stages(self) -> tuple[str, ...]:
        return ROUTES[self.route]

    def record(self, out: Path) -> Path:
        """<folder>/<route>.json: the run's CPU seconds and, once scored, its scores."""
        return out / self.folder / f"{self.route}.json"

    def final(self, out: Path) -> Path:
        """The student's final/ folder (its last stage's)."""
        return out / self.folder / self.stages[-1] / "final"


def plan_runs(seeds: int, budgets: list[int] | None = None, proxies: list[str] = ()) -> list[Run]:
    """Both routes for seeds 0..seeds-1: the headline run (`budgets` None) or a budget sweep, which
    adds an EUPE run per seed from each of the proxy checkpoints `proxies` (student budget 1x)."""
    runs = []
    for budget in budgets or [1]:
        for k in range(seeds):
            folder = f"seed_{k}" if budgets is None else f"sweep/x{budget}/seed_{k}"
            runs += [Run(route, k, budget, folder) for route in ROUTES]
    for p in proxies:
        runs += [Run("eupe", k, 1, f"sweep/proxy_{p}/seed_{k}", p) for k in range(seeds)]
    return runs


def stage_block(blocks: dict[str, Any], stage: str, run: Run) -> dict[str, Any]:
    """The stage's config block for this run: its seed moved by the seed index, its steps scaled."""
    block = copy.deepcopy(blocks[stage])
    block["seed"] = int(block.get("seed", 0)) + SEED_STRIDE * run.seed
    train = block.setdefault("train", {})
    train["max_steps"] = int(train["max_steps"]) * run.budget
    if run.lr:  # the schedule keeps its shape: the cosine floor stays the same fraction of the peak
        train["min_lr"] = float(train.get("min_lr", 0.0)) * run.lr / float(train["lr"])
        train["lr"] = run.lr
    if run.head:
        block.setdefault("heads", {})["hidden_dim"] = run.head
    return block


def plan_search(lrs: list[float], heads: list[int]) -> list[Run]:
    """`eupe demo --search`: both routes at every (lr, head width), seed 0, the headline budget."""
    return [
        Run(route, 0, 1, f"search/{route}_lr{lr:g}_h{h}", lr=lr, head=h)
        for route in ROUTES
        for lr in lrs
        for h in heads
    ]


def train_run(run: Run, out: Path, configure: Callable[[Run, str], Any], sources: dict[str, Any]) -> None:
    """Train the run's stages in order (`configure(run, stage)` gives each DistillConfig, `sources`
    the precomputed targets by stage; a stage without one runs its teachers live), and write the
    run's CPU seconds to its record."""
    t = time.process_time()
    for stage in run.stages:
        Distiller(configure(run, stage), source=sources.get(stage)).train()
    run.record(out).write_text(json.dumps({"cpu_s": round(time.process_time() - t, 1)}) + "\n")


def score_run(
    run: Run, out: Path, evaluate: Callable[[Any], dict[str, float]], key: str = "scores"
) -> dict[str, Any]:
    """Evaluate the run's final student and add the scores to its record (under `key`)."""
    record = run.record(out)
    entry = json.loads(record.read_text())
    entry[key] = evaluate(create_model(str(run.final(out))))
    record.write_text(json.dumps(entry, indent=1) + "\n")
    return entry


def read_run(run: Run, out: Path) -> dict[str, Any]:
    record = run.record(out)
    if not record.is_file():
        raise EupeError(f"{record} is missing: the {run.route} run for seed {run.seed} did not finish")
    return json.loads(record.read_text())


def claim(run: Run, out: Path) -> bool:
    """Atomically claim `run` for this process (False if another process has it)."""
    return claim_job(out / run.folder, run.route)


def claim_job(folder: Path, name: str) -> bool:
    """Atomically claim the job `name` in `folder` (creates <folder>/<name>.claim; False if taken)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / f"{name}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def run_in_child(job: Callable[[], None]) -> Any:
    """Start `job` in a forked single-thread process (its own seeds; no pickling, no files)."""
    import multiprocessing as mp

    process = mp.get_context("fork").Process(target=job, daemon=True)
    process.start()
    return process


def join_child(process: Any, what: str) -> None:
    process.join()
    if process.exitcode != 0:
        raise EupeError(f"the {what} process failed (exit code {process.exitcode}); see its output above")


def mean_and_spread(rows: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard deviation over seeds (ddof=1: the sample estimate; 0 for one seed)."""
    keys = rows[0].keys()
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    spread = {k: float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0 for k in keys}
    return mean, spread


def expert_targets_on_two_cores(
    experts: dict[str, Any], views: torch.Tensor, out: Path
) -> PrecomputedTargets:
    """The experts once over every view: the first here, the others in a forked process that hands
    its outputs back through a safetensors file. The targets are those of `PrecomputedTargets.compute`."""
    first, *rest = experts
    path = out / "expert_outputs.safetensors"

    def job() -> None:
        raw = PrecomputedTargets.outputs({n: experts[n] for n in rest}, views, progress=False)
        tensors = {f"{n}.{k}": getattr(y, k).contiguous() for n, y in raw.items() for k in ("cls", "patches")}
        save_file(tensors, str(path), metadata={n: json.dumps(list(y.grid)) for n, y in raw.items()})

    child = run_in_child(job)
    raw = PrecomputedTargets.outputs({first: experts[first]}, views)
    join_child(child, "expert targets")
    with safe_open(str(path), "pt") as f:
        grids = f.metadata()
        for n in rest:
            raw[n] = EncoderOutput(
                f.get_tensor(f"{n}.cls"), f.get_tensor(f"{n}.patches"), None, tuple(json.loads(grids[n]))
            )
    path.unlink()
    return PrecomputedTargets.from_outputs(views, {n: raw[n] for n in experts})
