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
from .proxy_build import ProxyChoice, choose_proxy
from .report import BENCH_KEYS, METRICS, expert_fit, write_report
from .routes import (
    ROUTES,
    Run,
    claim,
    claim_job,
    expert_targets_on_two_cores,
    join_child,
    mean_and_spread,
    plan_runs,
    plan_search,
    read_run,
    run_in_child,
    score_run,
    stage_block,
    train_run,
)
from .studies import search_results, sweep_results

CONFIGS = Path(__file__).resolve().parent / "configs"  # configs/demo, linked into the package
STAGES = ("stage1", "stage2", "stage3", "direct")  # the config blocks under `stages:`
KEEP_WHOLE = {  # fixed views whose targets exist already: no crop, no flip, no photometric change
    "crop_scale": [1.0, 1.0],
    "crop_ratio": [1.0, 1.0],
    "flip_p": 0.0,
    "jitter_p": 0.0,
    "blur_p": 0.0,
    "solarize_p": 0.0,
}


@dataclass
class DemoSettings:
    """The demo's data, benchmark and run numbers (the `demo:` block of configs/demo/*.yaml; saved
    to demo_settings.json). The training numbers are the stages' distill configs."""

    seed: int = 0  # the data (pool, views, benchmark sets); the runs' seeds are 0..seeds-1
    seeds: int = 3  # both routes are trained this many times; results are mean and spread
    sweep: tuple[int, ...] = (1, 2, 4)  # `--sweep`: budgets, as multiples of the student stages' steps
    search_lrs: tuple[float, ...] = (5e-4, 1e-3, 2e-3)  # `--search`: both routes' lr x head width grid,
    search_heads: tuple[int, ...] = (128, 256)  # scored on validation sets disjoint from the benchmarks
    pool_size: int = 800
    pool_side: int = 224
    views_per_image: int = 2
    view_side: int = 224
    effnet_resolution: int = EFFNET_RESOLUTION  # the experts' sides, for targets and benchmarks
    ocr_resolution: int = OCR_RESOLUTION
    proxy_resolution: int = 112  # the proxy's side: trained, scored, Stage-2 targets (Stage 3 draws)
    proxy_pool_size: int = 6000  # `eupe demo build-proxy`: composites (the demo's pool is a prefix)
    proxy_views: int = 2  # `eupe demo build-proxy`: cached augmented views per composite
    threads: int = 1
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


def benchmark_sets(splits: DemoSplits, s: DemoSettings, validation: bool = False) -> dict[str, Any]:
    """The held-out benchmark sets (pure functions of the demo seed), or with `validation` the same
    kinds of sets from the training pool's material (`validation_splits`), other seeds and no graf
    pair: what `--search` chooses settings on, never looking at the benchmarks."""
    if validation:
        splits = validation_splits(splits)
    side, seed = s.bench_side, s.seed + (500 if validation else 0)
    return {
        "knn": D.knn_set(splits, side),
        "text_train": _images_and_regions(D.text_set(splits, s.text_train, seed=seed + 1000, size=side)),
        "text_test": _images_and_regions(D.text_set(splits, s.text_test, seed=seed, size=side)),
        "homography": D.homography_set(splits, s.homographies, seed, size=side),
        "graf": None if validation else D.graf_pair(320, 256),
    }


def validation_splits(splits: DemoSplits) -> DemoSplits:
    """The training pool's material as held-out material: its cut-outs of the kNN classes and its
    text-free photos (validation sets for `--search`)."""
    return dataclasses.replace(
        splits,
        knn_stamps=tuple(a for a in splits.pool_stamps if a.label in splits.knn_classes),
        heldout_photos=tuple(a for a in splits.pool_photos if not a.has_text),
    )


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
    augment: dict[str, Any] | None = None,
    **extra: Any,
) -> DistillConfig:
    """One stage's distill config: its block of configs/demo/*.yaml plus what this run decides
    (output folder, the views as data, by default kept whole, the teachers, Stage 3's student.init)."""
    data = {
        "sources": [{"name": "demo_views", "type": "views", "path": str(views)}],
        "augment": augment or KEEP_WHOLE,
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


def trained_side(block: dict[str, Any]) -> int:
    """The side a stage trains its student at: the top of a pyramid, else the student's resolution
    (each model is scored at the side it was trained for)."""
    if block.get("stage") == "pyramid":
        return int(max(block["pyramid"]))
    return int(block["student"]["resolution"])


def run_demo(
    output_dir: str | os.PathLike = "demo-output",
    *,
    quick: bool = False,
    seeds: int | None = None,
    sweep: bool = False,
    search: bool = False,
    proxy_dir: str | os.PathLike | None = None,
    train_proxy: bool = False,
) -> dict[str, Any]:
    """Run the demo into `output_dir`; returns the results.json content (sweep: sweep.json's).

    `seeds` (default: the config's `demo.seeds`, 1 for a sweep) trains both routes that many times;
    `sweep` trains them at each budget of `demo.sweep` instead of the headline run, and EUPE students
    from the proxy build's 1/8, 1/4 and 1/2 checkpoints where the proxy's build folder has them.
    The proxy is the shipped one (`eupe/demo/proxy/`, hashes checked), the build in `proxy_dir`,
    or one built now (`train_proxy`). `search` trains both routes at every (lr, head width) of
    `demo.search_*` instead and scores them on validation sets (search.json, search.md)."""
    if sweep and search:
        raise ConfigError("give --sweep or --search, not both")
    s, blocks = load_demo(quick)
    n_seeds = seeds or (1 if sweep else s.seeds)
    if n_seeds < 1:
        raise ConfigError(f"--seeds must be >= 1; got {n_seeds}")
    out = Path(output_dir)
    if any(
        (out / f).exists() for f in ("results.json", "sweep.json", "search.json", "seed_0", "sweep", "search")
    ):
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

    # the proxy (Stage 1): trained once for the whole family, shipped with the package
    proxy = choose_proxy(out, quick=quick, proxy_dir=proxy_dir, train_proxy=train_proxy)
    t = lap("proxy", t0)

    # data: the pool, its views (a `views` data source), the benchmark sets (pure functions of the seed)
    splits = make_splits(s.seed)
    pool = D.training_pool(splits, s.pool_size, s.seed, D.PoolSettings(size=s.pool_side))
    views = D.make_views(pool, s.views_per_image, s.view_side, s.seed)
    views_path = out / "views.safetensors"
    save_file({"views": views}, str(views_path))
    sets = benchmark_sets(splits, s, validation=search)
    experts_spec = expert_specs(s, out)
    direct_cfg = stage_config(s, blocks["direct"], out / "direct", views_path, experts_spec)
    experts = LiveTeachers(direct_cfg, torch.device("cpu")).teachers
    t = lap("data", t)

    # the experts run once, over every view, at their native sides (one per core)
    expert_targets = expert_targets_on_two_cores(experts, views, out)
    t = lap("expert_targets", t)

    if search:
        runs = plan_search(list(s.search_lrs), list(s.search_heads))
    else:
        runs = plan_runs(n_seeds, list(s.sweep) if sweep else None, list(proxy.budgets) if sweep else [])
    proxies = {"": proxy.folder, **proxy.budgets}
    sides = {"eupe": trained_side(blocks["stage3"]), "direct": trained_side(blocks["direct"])}

    def configure(run: Run, stage: str, progress: bool = True) -> DistillConfig:
        extra: dict[str, Any] = {"train": {"progress": progress}}
        if stage == "stage3":  # Stage 3 continues Stage 2's student (and its heads)
            extra["student"] = {"init": str(out / run.folder / "stage2" / "final")}
        teachers = experts_spec if stage == "direct" else {
            "proxy": {"backend": "eupe", "checkpoint": str(proxies[run.proxy]), "resolution": s.proxy_resolution}
        }  # fmt: skip
        return stage_config(
            s, stage_block(blocks, stage, run), out / run.folder / stage, views_path, teachers, **extra
        )

    def score(model: torch.nn.Module, side: int) -> dict[str, float]:
        return evaluate(bench.encoder_featurizer(model, side), sets, s)

    def score_route(run: Run) -> None:
        score_run(run, out, lambda model: score(model, sides[run.route]))
        if run.route == "direct" and not (sweep or search):  # also at the EUPE student's side, for comparison
            score_run(run, out, lambda model: score(model, sides["eupe"]), key="scores_at_eupe_side")

    targets: dict[str, PrecomputedTargets] = {}

    def proxy_targets(key: str) -> PrecomputedTargets:
        """A proxy over every view at its side, once per process (deterministic: both get the same)."""
        if key not in targets:
            run = next(r for r in runs if r.route == "eupe" and r.proxy == key)
            live = LiveTeachers(configure(run, "stage2"), torch.device("cpu"))
            targets[key] = PrecomputedTargets.compute(live.teachers, views, progress=False)
        return targets[key]

    def eupe_runs(progress: bool) -> None:
        """Every EUPE run that no other process has claimed."""
        for run in (r for r in runs if r.route == "eupe"):
            if claim(run, out):
                sources = {"stage2": proxy_targets(run.proxy)}
                train_run(run, out, lambda r, st: configure(r, st, progress), sources)
                score_route(run)

    def references() -> None:
        """The experts' and the content-free reference's scores, by whichever process is free first."""
        if claim_job(out, "references"):
            refs = {n: evaluate(fn, sets, s) for n, fn in teacher_featurizers(experts).items()}
            refs["baseline_position"] = evaluate(bench.position_only(), sets, s)
            (out / "references.json").write_text(json.dumps(refs, indent=1) + "\n")

    def second_process() -> None:
        """The direct runs, then the EUPE runs nobody has claimed yet."""
        set_threads(s.threads)
        for run in (r for r in runs if r.route == "direct"):
            claim(run, out)
            train_run(run, out, lambda r, st: configure(r, st, progress=False), {"direct": expert_targets})
            score_route(run)
        eupe_runs(progress=False)
        references()

    t_cpu = time.process_time()
    proxy_targets("")  # before the fork: both processes share them
    timings["proxy_targets_cpu"] = round(time.process_time() - t_cpu, 1)
    child = run_in_child(second_process)
    eupe_runs(progress=True)
    proxy_model = create_model(str(proxy.folder))
    proxy_scores = score(proxy_model, s.proxy_resolution)
    budget_scores = (
        {k: score(create_model(str(f)), s.proxy_resolution) for k, f in proxy.budgets.items()}
        if sweep
        else {}
    )
    references()
    t = lap("eupe_runs_and_scores", t)
    with tqdm(total=1, desc="waiting for the second process") as bar:
        join_child(child, "second demo")
        bar.update(1)
    t = lap("waiting_for_second_process", t)
    teacher_scores = json.loads((out / "references.json").read_text())
    per_run = {r: read_run(r, out) for r in runs}
    for route in ROUTES:
        timings[f"{route}_cpu_per_student"] = round(
            float(np.mean([v["cpu_s"] for r, v in per_run.items() if r.route == route and not r.proxy])), 1
        )
    proxy_record = proxy_summary(proxy)
    if search:
        return search_results(out, runs, per_run, blocks, proxy_record, timings, t0, machine)
    resolutions = {
        **{f"teacher_{n}": int(e.resolution) for n, e in experts.items()},
        "baseline_position": s.bench_side,
        "proxy": s.proxy_resolution,
    }
    if sweep:
        return sweep_results(
            out, list(s.sweep), blocks, runs, per_run, teacher_scores,
            {"scores": proxy_scores, "budgets": budget_scores, "record": proxy_record, "steps": _budget_steps(proxy)},
            timings, t0, machine,
        )  # fmt: skip

    label = student_label(blocks)
    scores: dict[str, dict[str, float]] = {**teacher_scores, "proxy": proxy_scores}
    spreads: dict[str, dict[str, float]] = {n: dict.fromkeys(BENCH_KEYS, 0.0) for n in scores}
    for route in ROUTES:
        rows = [per_run[r]["scores"] for r in runs if r.route == route]
        scores[f"{route}_{label}"], spreads[f"{route}_{label}"] = mean_and_spread(rows)
        resolutions[f"{route}_{label}"] = sides[route]
    same_side = [per_run[r]["scores_at_eupe_side"] for r in runs if r.route == "direct"]
    direct_same_side = dict(zip(("mean", "spread"), mean_and_spread(same_side)), resolution=sides["eupe"])
    mean3 = {  # each seed's mean of the three benchmarks, per route: its spread judges the claim
        route: [float(np.mean([per_run[r]["scores"][m] for m in METRICS])) for r in runs if r.route == route]
        for route in ROUTES
    }
    seed0 = out / runs[0].folder
    direct = create_model(str(seed0 / "direct" / "final"))
    generalization = expert_fit(
        {
            "proxy": (proxy_model, s.proxy_resolution, proxy.folder),
            f"direct_{label}": (direct, sides["direct"], seed0 / "direct" / "final"),
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
        **({"stage1 (proxy)": proxy.run} if proxy.run is not None else {}),
        "stage2 (seed 0)": seed0 / "stage2",
        "stage3 (seed 0)": seed0 / "stage3",
        "direct (seed 0)": seed0 / "direct",
    }
    figures.loss_curves(runs_dirs, out / "loss_curves.png")
    figures.radar({n: {m: r[m] for m in METRICS} for n, r in scores.items()}, out / "radar.png")
    featurizers = {
        **teacher_featurizers(experts),
        "proxy": bench.encoder_featurizer(proxy_model, s.proxy_resolution),
        "eupe (seed 0)": bench.encoder_featurizer(
            create_model(str(seed0 / "stage3" / "final")), sides["eupe"]
        ),
        "direct (seed 0)": bench.encoder_featurizer(direct, sides["direct"]),
    }
    pca_images = np.stack(
        [sets["text_test"][0][0], sets["text_test"][0][1], sets["knn"][0][0], sets["homography"][0][0]]
    )
    figures.pca_grid(featurizers, pca_images, out / "pca.png")
    lap("figures", t)
    timings["total"] = round(time.perf_counter() - t0, 1)
    results = {
        "models": {
            n: {
                **{m: r[m] for m in METRICS},
                "spread": {m: spreads[n][m] for m in METRICS},
                "resolution": resolutions[n],
            }
            for n, r in scores.items()
        },
        "seeds": list(range(n_seeds)),
        "proxy": proxy_record,
        "timings_s": timings,
        "machine": machine,
    }
    details = {
        "models": scores,
        "spread": spreads,
        "resolution": resolutions,
        "per_seed": {f"{r.route}_{label}/seed_{r.seed}": v for r, v in per_run.items()},
        "student": label,
        "mean_of_three": {
            f"{rt}_{label}": {"per_seed": v, "spread": mean_and_spread([{"m": x} for x in v])[1]["m"]}
            for rt, v in mean3.items()
        },
        f"direct_{label}_at_{sides['eupe']}": direct_same_side,
        "proxy_build": proxy.build,
        "search": json.loads((CONFIGS / "search.json").read_text())
        if (CONFIGS / "search.json").is_file()
        else None,
        "expert_fit": generalization,
        "fit_summary_runs": {n: str(p) for n, p in runs_dirs.items()},
        "settings": {
            "demo": dataclasses.asdict(s),
            "stages": {
                n: OmegaConf.to_container(OmegaConf.load(p / "config.yaml"))
                for n, p in runs_dirs.items()
                if (p / "config.yaml").is_file()
            },
        },
        "quick": quick,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=1) + "\n")
    write_report(out, results, details)
    return results


def proxy_summary(proxy: ProxyChoice) -> dict[str, Any]:
    """results.json's `proxy`: where it came from, its one-off CPU cost and its files' hashes."""
    return {
        "source": proxy.source,
        "folder": str(proxy.folder),
        "cpu_seconds": proxy.build["cpu_seconds"],
        "steps": proxy.build["steps"],
        "command": proxy.build["command"],
        "sha256": proxy.build["sha256"],
    }


def _budget_steps(proxy: ProxyChoice) -> dict[str, int]:
    """The proxy's training steps at each of its checkpoints, and at the end ("1")."""
    steps = {n: int(b["steps"]) for n, b in proxy.build.get("budgets", {}).items() if n in proxy.budgets}
    return {**steps, "1": int(proxy.build["steps"])}
