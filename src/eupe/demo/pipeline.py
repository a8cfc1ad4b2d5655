"""`eupe demo`: the EUPE recipe in miniature, on a 2-core CPU, from one seed.

    data -> fixed views -> Stage 1 (EfficientNet-Lite0 + PP-OCRv4 det -> ViT-S proxy) -> Stage 2
    (proxy -> ViT-T, fixed resolution) -> Stage 3 (multi-resolution, the proxy online) ;
    ablation: both experts -> ViT-T directly with Stages 1+2+3's steps ;
    the three demo benchmarks for all five models -> results.json, report.md, figures.

Every stage is an ordinary `eupe distill` run through the trainer (`Distiller`), configured by
configs/demo/{full,quick}.yaml, written to <output-dir>/<stage>/ (config.yaml, metrics.jsonl,
checkpoints/, final/): `eupe eval` reads its final/ and `eupe distill --resume` accepts it. The
training views are a fixed set, K augmented views per pool image, stored once as a `views` data
source (views.safetensors). The frozen teachers of Stages 1, 2 and the ablation run once over
them (`PrecomputedTargets`); Stage 3's proxy runs live at its own drawn scale (paper 3.3) through
the `eupe` teacher backend. Torch and onnxruntime run on one thread: on a loaded 2-core box
small-tensor work is many times slower with two, and EfficientNet's outputs change with the thread
count, so one thread is also what makes a re-run print the same table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from tqdm import tqdm

from ..distill.config import DistillConfig, load_config, read_yaml
from ..distill.targets import LiveTeachers, PrecomputedTargets
from ..distill.trainer import Distiller
from ..errors import ConfigError
from ..models import create_model
from . import bench, figures
from . import data as D
from .assets import DemoSplits, make_splits
from .experts import (
    EFFNET_RESOLUTION,
    OCR_RESOLUTION,
    convert_effnet_lite0,
    effnet_teacher_spec,
    ocr_teacher_spec,
)
from .report import BENCH_KEYS, METRICS, expert_fit, sweep_results, write_report
from .routes import (
    ROUTES,
    Run,
    claim,
    claim_job,
    expert_targets_on_two_cores,
    join_child,
    mean_and_spread,
    plan_runs,
    read_run,
    run_in_child,
    score_run,
    stage_block,
    train_run,
    wait_for,
)

CONFIGS = Path(__file__).resolve().parent / "configs"  # configs/demo, linked into the package
STAGES = ("stage1", "stage2", "stage3", "direct")  # the config blocks under `stages:`


@dataclass
class DemoSettings:
    """The demo's data, benchmark and run numbers (the `demo:` block of configs/demo/*.yaml; saved
    to demo_settings.json). The training numbers are the stages' distill configs."""

    seed: int = 0  # the data (pool, views, benchmark sets); the runs' seeds are 0..seeds-1
    seeds: int = 3  # both routes are trained this many times; results are mean and spread
    sweep: tuple[int, ...] = (1, 2, 4)  # `--sweep`: budgets, as multiples of the student stages' steps
    pool_size: int = 800
    pool_side: int = 224
    views_per_image: int = 2
    view_side: int = 224
    effnet_resolution: int = EFFNET_RESOLUTION  # the experts' sides, for targets and benchmarks
    ocr_resolution: int = OCR_RESOLUTION
    proxy_resolution: int = 112  # the side of the proxy's Stage-2 targets (Stage 3 draws its own)
    threads: int = 1
    eval_resolution: int = 224  # students' input side in the benchmarks (teachers: their native side)
    bench_side: int = 224  # benchmark images
    knn_k: int = 1
    text_train: int = 64
    text_test: int = 32
    homographies: int = 16


def load_demo(quick: bool = False) -> tuple[DemoSettings, dict[str, Any]]:
    """configs/demo/full.yaml (or quick.yaml): the settings and each stage's distill config block."""
    path = CONFIGS / ("quick.yaml" if quick else "full.yaml")
    raw = read_yaml(path)
    settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DemoSettings), raw.get("demo", {})))
    stages = raw.get("stages", {})
    missing = [n for n in STAGES if n not in stages]
    if missing:
        raise ConfigError(f"{path}: `stages` lacks {missing}")
    return settings, {n: OmegaConf.to_container(stages[n], resolve=True) for n in STAGES}


def _images_and_regions(text_set: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The text benchmark scores text *regions* (line boxes): glyph strokes are finer than a patch."""
    images, _glyphs, regions = text_set
    return images, regions


def benchmark_sets(splits: DemoSplits, s: DemoSettings) -> dict[str, Any]:
    """The held-out benchmark sets (pure functions of the demo seed)."""
    side = s.bench_side
    return {
        "knn": D.knn_set(splits, side),
        "text_train": _images_and_regions(D.text_set(splits, s.text_train, seed=s.seed + 1000, size=side)),
        "text_test": _images_and_regions(D.text_set(splits, s.text_test, seed=s.seed, size=side)),
        "homography": D.homography_set(splits, s.homographies, s.seed, size=side),
        "graf": D.graf_pair(320, 256),
    }


def teacher_featurizers(experts: dict[str, Any]) -> dict[str, bench.Featurizer]:
    """The experts as benchmark models, each at its native side."""
    return {f"teacher_{n}": (lambda x, t=t: t(x, int(t.resolution))) for n, t in experts.items()}


def _spec_dict(spec: Any, resolution: int) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["resolution"] = resolution
    d["mean"], d["std"] = list(d["mean"]), list(d["std"])
    return d


def set_threads(threads: int) -> None:
    """Fix torch's intra- and inter-op threads (inter-op can only be set once per process)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set (a second run in the same process): keep it
        pass


def evaluate(model: bench.Featurizer, sets: dict[str, Any], s: DemoSettings) -> dict[str, float]:
    """The three demo benchmarks for one frozen model."""
    knn = bench.knn_accuracy(model, *sets["knn"], k=s.knn_k)
    text = bench.text_iou(model, sets["text_train"], sets["text_test"], seed=s.seed)
    dense = bench.pck(model, *sets["homography"], graf=sets["graf"])
    return {
        "knn": knn,
        "text_iou": text,
        "pck": dense["pck"],
        "pck_warps": dense["pck_warps"],
        "pck_graf": dense.get("pck_graf", float("nan")),
    }


def _machine(s: DemoSettings) -> dict[str, Any]:
    import onnxruntime

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_threads": s.threads,
    }


def stage_config(
    s: DemoSettings,
    block: dict[str, Any],
    output_dir: Path,
    views: Path,
    teachers: dict[str, Any],
    **extra: Any,
) -> DistillConfig:
    """One stage's distill config: its block of configs/demo/*.yaml plus what this run decides
    (output folder, the fixed views as data kept whole, the teachers, Stage 3's student.init)."""
    data = {
        "sources": [{"name": "demo_views", "type": "views", "path": str(views)}],
        "augment": {
            "crop_scale": [1.0, 1.0],
            "crop_ratio": [1.0, 1.0],
            "flip_p": 0.0,
            "jitter_p": 0.0,
            "blur_p": 0.0,
            "solarize_p": 0.0,
        },
        "num_workers": 0,
    }
    mapping = OmegaConf.merge(block, {"teachers": teachers, "data": data, **extra})
    return load_config(None, [f"output_dir={output_dir}", f"train.threads={s.threads}"], mapping=mapping)


def expert_specs(s: DemoSettings, out: Path) -> dict[str, Any]:
    """The two experts as teacher specs (the converted EfficientNet weights live in out/experts)."""
    weights = convert_effnet_lite0(out / "experts" / "effnet_lite0.safetensors")
    ocr = _spec_dict(ocr_teacher_spec(), s.ocr_resolution)
    ocr["kwargs"]["threads"] = s.threads
    return {"effnet": _spec_dict(effnet_teacher_spec(weights), s.effnet_resolution), "ocr": ocr}


def student_label(blocks: dict[str, Any]) -> str:
    """The student's short name in the results ("eupe_vitp16" -> "vitp16")."""
    name = str(blocks["stage2"]["student"]["name"])
    return name.removeprefix("eupe_")


def run_demo(
    output_dir: str | os.PathLike = "demo-output",
    *,
    quick: bool = False,
    seeds: int | None = None,
    sweep: bool = False,
) -> dict[str, Any]:
    """Run the demo into `output_dir`; returns the results.json content (sweep: sweep.json's).

    `seeds` (default: the config's `demo.seeds`, 1 for a sweep) trains both routes that many times;
    `sweep` trains them at each budget of `demo.sweep` instead of the headline run."""
    s, blocks = load_demo(quick)
    n_seeds = seeds or (1 if sweep else s.seeds)
    if n_seeds < 1:
        raise ConfigError(f"--seeds must be >= 1; got {n_seeds}")
    out = Path(output_dir)
    if any((out / f).exists() for f in ("results.json", "sweep.json", "stage1")):
        raise ConfigError(f"output_dir={str(out)!r} already holds a demo run; pick another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_settings.json").write_text(json.dumps(dataclasses.asdict(s), indent=1) + "\n")
    set_threads(s.threads)
    machine = _machine(s)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        return now

    # data: the pool, its views (a `views` data source), the benchmark sets (pure functions of the seed)
    splits = make_splits(s.seed)
    pool = D.training_pool(splits, s.pool_size, s.seed, D.PoolSettings(size=s.pool_side))
    views = D.make_views(pool, s.views_per_image, s.view_side, s.seed)
    views_path = out / "views.safetensors"
    save_file({"views": views}, str(views_path))
    sets = benchmark_sets(splits, s)
    experts_spec = expert_specs(s, out)
    stage1 = stage_config(s, blocks["stage1"], out / "stage1", views_path, experts_spec)
    experts = LiveTeachers(stage1, torch.device("cpu")).teachers
    t = lap("data", t0)

    # the experts run once, over every view, at their native sides (one per core)
    expert_targets = expert_targets_on_two_cores(experts, views, out)
    t = lap("expert_targets", t)

    runs = plan_runs(n_seeds, list(s.sweep) if sweep else None)
    final = str(out / "stage1" / "final")
    proxy_spec = {"proxy": {"backend": "eupe", "checkpoint": final, "resolution": s.proxy_resolution}}

    def configure(run: Run, stage: str, progress: bool = True) -> DistillConfig:
        extra: dict[str, Any] = {"train": {"progress": progress}}
        if stage == "stage3":  # Stage 3 continues Stage 2's student (and its heads)
            extra["student"] = {"init": str(out / run.folder / "stage2" / "final")}
        teachers = experts_spec if stage == "direct" else proxy_spec
        return stage_config(
            s, stage_block(blocks, stage, run), out / run.folder / stage, views_path, teachers, **extra
        )

    def score(model: torch.nn.Module) -> dict[str, float]:
        return evaluate(bench.encoder_featurizer(model, s.eval_resolution), sets, s)

    ready = out / "proxy.ready"  # written once Stage 1 has finished

    def proxy_targets() -> PrecomputedTargets:
        """The trained proxy over every view, once per process (deterministic: both get the same)."""
        proxy = LiveTeachers(configure(runs[0], "stage2"), torch.device("cpu"))
        return PrecomputedTargets.compute(proxy.teachers, views, progress=False)

    def eupe_runs(targets: PrecomputedTargets | None, progress: bool) -> None:
        """Every EUPE run that no other process has claimed."""
        for run in (r for r in runs if r.route == "eupe"):
            if claim(run, out):
                targets = targets or proxy_targets()
                train_run(run, out, lambda r, st: configure(r, st, progress), {"stage2": targets})
                score_run(run, out, score)

    def references() -> None:
        """The experts' and the content-free reference's scores, by whichever process is free first."""
        if claim_job(out, "references"):
            refs = {n: evaluate(fn, sets, s) for n, fn in teacher_featurizers(experts).items()}
            refs["baseline_position"] = evaluate(bench.position_only(), sets, s)
            (out / "references.json").write_text(json.dumps(refs, indent=1) + "\n")

    def second_process() -> None:
        """The direct runs, then EUPE runs once the proxy exists."""
        set_threads(s.threads)
        for run in (r for r in runs if r.route == "direct"):
            claim(run, out)
            train_run(run, out, lambda r, st: configure(r, st, progress=False), {"direct": expert_targets})
            score_run(run, out, score)
        wait_for(ready)
        eupe_runs(None, progress=False)
        references()

    child = run_in_child(second_process)
    t_cpu = time.process_time()
    Distiller(stage1, source=expert_targets).train()
    targets = proxy_targets()
    ready.write_text("proxy ready\n")
    timings["proxy_cpu"] = round(time.process_time() - t_cpu, 1)  # Stage 1 + the proxy's targets
    t = lap("stage1_and_proxy_targets", t)
    eupe_runs(targets, progress=True)
    proxy_model = create_model(str(out / "stage1" / "final"))
    proxy_scores = score(proxy_model)
    references()
    t = lap("eupe_runs_and_scores", t)
    with tqdm(total=1, desc="waiting for the second process") as bar:
        join_child(child, "second demo")
        bar.update(1)
    t = lap("waiting_for_second_process", t)
    teacher_scores = json.loads((out / "references.json").read_text())
    per_run = {(r.route, r.budget, r.seed): read_run(r, out) for r in runs}
    for route in ROUTES:
        timings[f"{route}_cpu_per_student"] = round(
            float(np.mean([v["cpu_s"] for (rt, *_), v in per_run.items() if rt == route])), 1
        )
    if sweep:
        return sweep_results(
            out, list(s.sweep), blocks, runs, per_run, teacher_scores, proxy_scores, timings, t0, machine
        )

    label = student_label(blocks)
    scores: dict[str, dict[str, float]] = {**teacher_scores, "proxy": proxy_scores}
    spreads: dict[str, dict[str, float]] = {n: dict.fromkeys(BENCH_KEYS, 0.0) for n in scores}
    for route in ROUTES:
        rows = [per_run[(route, 1, k)]["scores"] for k in range(n_seeds)]
        scores[f"{route}_{label}"], spreads[f"{route}_{label}"] = mean_and_spread(rows)
    seed0 = out / runs[0].folder
    direct = create_model(str(seed0 / "direct" / "final"))
    generalization = expert_fit(
        {
            "proxy": (proxy_model, stage1.students["student"].resolution, out / "stage1"),
            f"direct_{label}": (direct, blocks["direct"]["student"]["resolution"], seed0 / "direct"),
        },
        experts,
        expert_targets.norm,
        {  # ~64 images each: the experts run once more over every set
            "training views": views[:64].float().div(255),
            "kNN cut-outs": bench.to01(sets["knn"][0][::3]),
            "text photos": bench.to01(sets["text_test"][0]),
        },
    )
    t = lap("expert_fit", t)
    runs_dirs = {
        "stage1 (proxy)": out / "stage1",
        "stage2 (seed 0)": seed0 / "stage2",
        "stage3 (seed 0)": seed0 / "stage3",
        "direct (seed 0)": seed0 / "direct",
    }
    figures.loss_curves(runs_dirs, out / "loss_curves.png")
    figures.radar({n: {m: r[m] for m in METRICS} for n, r in scores.items()}, out / "radar.png")
    featurizers = {
        **teacher_featurizers(experts),
        "proxy": bench.encoder_featurizer(proxy_model, s.eval_resolution),
        "eupe (seed 0)": bench.encoder_featurizer(
            create_model(str(seed0 / "stage3" / "final")), s.eval_resolution
        ),
        "direct (seed 0)": bench.encoder_featurizer(direct, s.eval_resolution),
    }
    pca_images = np.stack(
        [sets["text_test"][0][0], sets["text_test"][0][1], sets["knn"][0][0], sets["homography"][0][0]]
    )
    figures.pca_grid(featurizers, pca_images, out / "pca.png")
    lap("figures", t)
    timings["total"] = round(time.perf_counter() - t0, 1)
    results = {
        "models": {
            n: {**{m: r[m] for m in METRICS}, "spread": {m: spreads[n][m] for m in METRICS}}
            for n, r in scores.items()
        },
        "seeds": list(range(n_seeds)),
        "timings_s": timings,
        "machine": machine,
    }
    details = {
        "models": scores,
        "spread": spreads,
        "per_seed": {f"{rt}_{label}/seed_{k}": v for (rt, _b, k), v in per_run.items()},
        "student": label,
        "expert_fit": generalization,
        "fit_summary_runs": {n: str(p) for n, p in runs_dirs.items()},
        "settings": {
            "demo": dataclasses.asdict(s),
            "stages": {
                n: OmegaConf.to_container(OmegaConf.load(p / "config.yaml")) for n, p in runs_dirs.items()
            },
        },
        "quick": quick,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=1) + "\n")
    write_report(out, results, details)
    return results
