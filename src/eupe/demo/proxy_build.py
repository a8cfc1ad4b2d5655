"""`eupe demo build-proxy`: the demo's Stage 1 trained at length, once, and shipped with the package.

The paper trains its proxy once per family, at length, and every student of the family then
learns from it; that is where the EUPE route's advantage comes from. The demo does the same:

1. **Pool.** `demo.proxy_pool_size` composites (the demo's generator, seed `demo.seed`; the demo's
   own 800 are a prefix), stored as a `views` source (`work/pool.safetensors`).
2. **The experts, once, into the teacher cache** (`eupe.distill.cache`): K = `demo.proxy_views`
   random-resized-crop + flip views per composite, the normalized targets of both experts at
   their native sides, written by two ranks (one per core, gloo) to `work/cache/`.
3. **Stage 1** (`stages.stage1` of configs/demo/full.yaml) reads the cache (`data.teacher_cache`)
   for `--steps N` optimizer steps, or as many as `--hours H` allow at the step time measured on a
   short probe. Checkpoints at 1/8, 1/4, 1/2 and the end; at each of the first three the proxy is
   also written whole to `work/budgets/<fraction>/` (the sweep's proxy budgets). A killed build
   resumes from its newest checkpoint; the pool and the cache are kept.
4. **Scores** of the proxy (final and budgets) on the three demo benchmarks at the side it is
   trained and used at (`demo.proxy_resolution`), beside the experts' at their native sides.
5. **The shipped files**, at the top of the output folder: `config.json`, `model.safetensors` and
   `heads.safetensors` in float16, `teacher_norm.safetensors`, and `build.json` (the command, seed,
   steps, CPU seconds, sha256 of every file, scores). `src/eupe/demo/proxy/` is such a folder;
   `load_shipped` checks the hashes before the demo uses it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..distill.cache import CACHE_FILE, CacheConfig
from ..distill.cache_build import build_cache
from ..distill.config import DistillConfig, load_config
from ..distill.trainer import FINAL_DIR, Distiller
from ..errors import ConfigError, EupeError
from ..files import atomic_write, file_sha256, write_atomic_dir
from ..models import create_model
from ..runtime import shutdown
from . import bench
from . import data as D
from .assets import make_splits
from .routes import join_child, run_in_child

SHIPPED = Path(__file__).resolve().parent / "proxy"  # the proxy that ships with the package
MODEL_FILES = ("config.json", "model.safetensors", "heads.safetensors", "teacher_norm.safetensors")
BUILD_FILE = "build.json"
FRACTIONS = {8: "1_8", 4: "1_4", 2: "1_2"}  # checkpoints kept whole at 1/8, 1/4, 1/2 of the steps
CACHE_AUGMENT = {  # the demo's views: random-resized crops and flips, no photometric changes
    "crop_scale": [0.35, 1.0],
    "flip_p": 0.5,
    "jitter_p": 0.0,
    "blur_p": 0.0,
    "solarize_p": 0.0,
}


# -- the shipped folder -------------------------------------------------------------------------


def load_shipped(folder: str | os.PathLike = SHIPPED) -> dict[str, Any]:
    """build.json of a proxy folder, after checking that every file's sha256 is the recorded one."""
    folder = Path(folder)
    record = folder / BUILD_FILE
    if not record.is_file():
        raise EupeError(f"{folder}: no {BUILD_FILE}; not a proxy folder written by `eupe demo build-proxy`")
    build = json.loads(record.read_text())
    for name in MODEL_FILES:
        path = folder / name
        if not path.is_file():
            raise EupeError(f"{folder}: {name} is missing; rebuild it with `eupe demo build-proxy`")
        if file_sha256(path) != build["sha256"].get(name):
            raise EupeError(
                f"{path}: sha256 differs from {BUILD_FILE}'s; the file is corrupt or was changed "
                f"(rebuild with `eupe demo build-proxy`, or run `eupe demo --train-proxy`)"
            )
    return build


def _half(src: Path, dst: Path) -> None:
    """A safetensors file with its floating tensors in float16 (metadata kept)."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(src)).items()}
    save_file(state, str(dst), metadata=meta)


def ship(final: Path, out: Path, build: dict[str, Any]) -> dict[str, Any]:
    """Write the shippable files of the trained proxy `final/` into `out` (weights and heads in
    float16) and build.json with their hashes; returns build.json's content."""
    for name in MODEL_FILES:
        if name in ("model.safetensors", "heads.safetensors"):
            atomic_write(out / name, lambda tmp, name=name: _half(final / name, tmp))
        else:
            atomic_write(out / name, (final / name).read_bytes())
    build = {**build, "sha256": {name: file_sha256(out / name) for name in MODEL_FILES}}
    atomic_write(out / BUILD_FILE, json.dumps(build, indent=1) + "\n")
    return build


# -- the build ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cache_on_two_cores(cfg: DistillConfig, cc: CacheConfig, ranks: int = 2) -> None:
    """`eupe cache-teacher` on `ranks` forked single-thread processes joined by gloo (torchrun's
    environment, set in each child), so each core runs both experts on its half of the images."""
    port = _free_port()

    def job(rank: int) -> None:
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
        build_cache(cfg, cc)
        shutdown()

    children = [run_in_child(lambda r=r: job(r)) for r in range(ranks)]
    for child in children:
        join_child(child, "teacher cache")


class ProxyTrainer(Distiller):
    """Stage 1, also writing the proxy whole (model, heads, TeacherNorm) at the marked steps."""

    def __init__(self, cfg: DistillConfig, marks: dict[int, Path], **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.marks = marks

    def save_checkpoint(self) -> None:
        super().save_checkpoint()
        if self.step in self.marks:
            (s,) = self.students.values()

            def fill(tmp: Path) -> None:
                s.model.save_pretrained(tmp)
                s.heads.save(tmp)
                self.norm.save(tmp)
                (tmp / "distill.json").write_text(json.dumps({"step": self.step}) + "\n")

            write_atomic_dir(self.marks[self.step], fill)


def _seconds_per_step(cfg: DistillConfig, probe: Path, steps: int = 8) -> float:
    """Wall seconds per Stage-1 step, from a short throwaway run: the trainer's own images/s over
    its last steps (the first two, which warm up, not counted)."""
    options = [
        f"output_dir={probe}", f"train.max_steps={steps}", "train.warmup_steps=0",
        "train.log_every=1", "train.progress=false",
    ]  # fmt: skip
    Distiller(load_config(None, options, mapping=_as_mapping(cfg))).train()
    rows = [json.loads(x) for x in (probe / "metrics.jsonl").read_text().splitlines()][2:]
    shutil.rmtree(probe, ignore_errors=True)
    return float(sum(cfg.train.global_batch / r["images_per_s"] for r in rows) / len(rows))


def _as_mapping(cfg: DistillConfig) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def _scores(s: Any, base: DistillConfig, run: Path, work: Path) -> dict[str, Any]:
    """The three demo benchmarks for the finished proxy and its checkpoints at the proxy's side,
    and for the experts at their native sides."""
    from ..distill.targets import LiveTeachers
    from .pipeline import benchmark_sets, evaluate, teacher_featurizers

    sets = benchmark_sets(make_splits(s.seed), s)

    def score(folder: Path) -> dict[str, float]:
        model = create_model(str(folder))
        return evaluate(bench.encoder_featurizer(model, s.proxy_resolution), sets, s)

    experts = LiveTeachers(base, torch.device("cpu")).teachers
    return {
        "proxy": score(run / FINAL_DIR),
        "budgets": {name: score(work / "budgets" / name) for name in FRACTIONS.values()},
        "experts": {n: evaluate(fn, sets, s) for n, fn in teacher_featurizers(experts).items()},
    }


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def build_proxy(
    output_dir: str | os.PathLike = "proxy-build",
    *,
    steps: int | None = None,
    hours: float | None = None,
    seed: int | None = None,
    depth: int | None = None,
    quick: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Build the demo's proxy into `output_dir` (see the module docstring); returns build.json's
    content. `steps` / `hours` (at most one) replace the config's Stage-1 length, `seed` its
    seed, `depth` its number of blocks; `quick` uses configs/demo/quick.yaml (tiny, for tests)."""
    from .pipeline import expert_specs, load_demo, set_threads, stage_config

    if steps is not None and hours is not None:
        raise ConfigError("give --steps or --hours, not both")
    if (steps is not None and steps < 8) or (hours is not None and hours <= 0):
        raise ConfigError(f"--steps must be >= 8 and --hours > 0; got steps={steps}, hours={hours}")
    s, blocks = load_demo(quick)
    set_threads(s.threads)
    out = Path(output_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    phases = json.loads((work / "phases.json").read_text()) if (work / "phases.json").is_file() else {}

    def done(phase: str, cpu0: float, wall0: float) -> None:
        phases[phase] = {"cpu_s": round(_cpu() - cpu0, 1), "wall_s": round(time.perf_counter() - wall0, 1)}
        atomic_write(work / "phases.json", json.dumps(phases, indent=1) + "\n")

    # 1. the pool, as a `views` source
    pool_path = work / "pool.safetensors"
    if not pool_path.is_file():
        cpu0, wall0 = _cpu(), time.perf_counter()
        pool = D.training_pool(
            make_splits(s.seed), s.proxy_pool_size, s.seed, D.PoolSettings(size=s.pool_side)
        )
        views = torch.from_numpy(pool).permute(0, 3, 1, 2).contiguous()
        atomic_write(pool_path, lambda tmp: save_file({"views": views}, str(tmp)))
        del pool, views
        done("pool", cpu0, wall0)

    block = json.loads(json.dumps(blocks["stage1"]))
    if seed is not None:
        block["seed"] = int(seed)
    if depth is not None:
        block["student"].setdefault("overrides", {})["depth"] = int(depth)
    experts = expert_specs(s, work)
    # TeacherNorm from the first 32 batches (1024 views), not the trainer's 500: they would run the
    # experts over the pool a second time
    norm = {"batches": 32, **block.get("norm", {})}
    base = stage_config(s, block, work / "stage1", pool_path, experts, augment=CACHE_AUGMENT, norm=norm)

    # 2. the experts' targets, once, into the teacher cache
    cache = work / "cache"
    if not (cache / CACHE_FILE).is_file():
        shutil.rmtree(cache, ignore_errors=True)
        cpu0, wall0 = _cpu(), time.perf_counter()
        cc = CacheConfig(dir=str(cache), views=s.proxy_views, dtype="bf16")
        cache_on_two_cores(base, cc)
        done("expert_cache", cpu0, wall0)

    # 3. Stage 1 from the cache (resumed if a checkpoint exists)
    run = work / "stage1"
    if not (run / FINAL_DIR / "config.json").is_file():
        cpu0, wall0 = _cpu(), time.perf_counter()
        resume = (run / "config.yaml").is_file()
        if resume:
            cfg = load_config(run / "config.yaml", [f"output_dir={run}"])
            print(f"build-proxy: resuming {run} (its config's {cfg.train.max_steps} steps)")
        else:
            cached = [f"data.teacher_cache={cache}"]
            if hours is not None:
                probe = load_config(None, cached, mapping=_as_mapping(base))
                per_step = _seconds_per_step(probe, work / "probe")
                steps = int(hours * 3600 / per_step)
                print(f"build-proxy: {per_step:.2f} s per step -> {steps} steps in {hours} h")
            n = int(steps if steps is not None else block["train"]["max_steps"])
            n = -(-n // 8) * 8  # a multiple of 8: checkpoints land on 1/8, 1/4, 1/2
            options = [*cached, f"train.max_steps={n}", f"train.checkpoint_every={n // 8}"]
            cfg = load_config(None, options, mapping=_as_mapping(base))
        n = cfg.train.max_steps
        marks = {n // f: work / "budgets" / name for f, name in FRACTIONS.items()}
        ProxyTrainer(cfg, marks, resume=resume).train()
        done("stage1", cpu0, wall0)
    cfg = load_config(run / "config.yaml", [f"output_dir={run}"])

    # 4. scores at the proxy's side, the experts' at theirs (once: kept in work/scores.json)
    scored = work / "scores.json"
    if not scored.is_file():
        cpu0, wall0 = _cpu(), time.perf_counter()
        atomic_write(scored, json.dumps(_scores(s, base, run, work), indent=1) + "\n")
        done("scores", cpu0, wall0)
    scores = json.loads(scored.read_text())

    # 5. the shippable files
    train_cpu = sum(phases[p]["cpu_s"] for p in ("pool", "expert_cache", "stage1") if p in phases)
    build = {
        "command": command or f"eupe demo build-proxy --output-dir {out} --steps {cfg.train.max_steps}",
        "seed": int(cfg.seed),
        "steps": int(cfg.train.max_steps),
        "cpu_seconds": round(train_cpu, 1),
        "scores": scores["proxy"],
        "resolution": s.proxy_resolution,
        "student": {
            "name": cfg.students["student"].name,
            "depth": block["student"].get("overrides", {}).get("depth"),
        },
        "params": sum(p.numel() for p in create_model(str(run / FINAL_DIR)).parameters()),
        "budgets": {
            name: {"steps": cfg.train.max_steps // f, "scores": scores["budgets"][name]}
            for f, name in FRACTIONS.items()
        },
        "experts": scores["experts"],
        "data": {"pool_size": s.proxy_pool_size, "views_per_image": s.proxy_views, "seed": s.seed},
        "phases": phases,
        "quick": quick,
    }
    return ship(run / FINAL_DIR, out, build)


# -- the demo's choice ------------------------------------------------------------------------------
@dataclass
class ProxyChoice:
    """The proxy a demo run uses: its folder, where it came from and what it cost (build.json)."""

    folder: Path
    source: str  # "shipped" (the package's), or "trained" (--train-proxy or --proxy-dir)
    build: dict[str, Any]
    budgets: dict[str, Path]  # the build's 1/8, 1/4, 1/2 checkpoints, where the build folder has them
    run: Path | None  # the build's Stage-1 run folder (metrics.jsonl), where it has one


def choose_proxy(
    out: Path, *, quick: bool = False, proxy_dir: str | os.PathLike | None = None, train_proxy: bool = False
) -> ProxyChoice:
    """The shipped proxy (hashes checked), a build folder (`proxy_dir`), or one built now into
    `out`/proxy (`train_proxy`, with the config's Stage-1 budget)."""
    if proxy_dir is not None and train_proxy:
        raise ConfigError("give --proxy-dir or --train-proxy, not both")
    if train_proxy:
        folder = out / "proxy"
        build_proxy(folder, quick=quick, command=f"eupe demo --train-proxy{' --quick' if quick else ''}")
    else:
        folder = Path(proxy_dir) if proxy_dir is not None else SHIPPED
    build = load_shipped(folder)
    budgets = {n: folder / "work" / "budgets" / n for n in FRACTIONS.values()}
    run = folder / "work" / "stage1"
    return ProxyChoice(
        folder=folder,
        source="shipped" if folder == SHIPPED else "trained",
        build=build,
        budgets={n: p for n, p in budgets.items() if (p / "config.json").is_file()},
        run=run if (run / "metrics.jsonl").is_file() else None,
    )
