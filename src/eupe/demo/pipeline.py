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
from ..errors import ConfigError, EupeError
from ..models import create_model
from . import bench, figures
from . import data as D
from .assets import make_splits
from .experts import (
    EFFNET_RESOLUTION,
    OCR_RESOLUTION,
    convert_effnet_lite0,
    effnet_teacher_spec,
    ocr_teacher_spec,
)
from .report import METRICS, MODEL_NAMES, expert_fit, write_report

CONFIGS = Path(__file__).resolve().parent / "configs"  # configs/demo, linked into the package
STAGES = ("stage1", "stage2", "stage3", "direct")


@dataclass
class DemoSettings:
    """The demo's data and benchmark numbers (the `demo:` block of configs/demo/*.yaml; saved to
    demo_settings.json). The training numbers are the stages' distill configs."""

    seed: int = 0
    pool_size: int = 800
    views_per_image: int = 2
    view_side: int = 192
    effnet_resolution: int = 160  # the experts' sides for training targets (a multiple of 32)
    ocr_resolution: int = 192  # (a multiple of 16: a 12x12 grid); the benchmarks use their native sides
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
    s: DemoSettings, block: dict[str, Any], out: Path, name: str, teachers: dict[str, Any], **extra: Any
) -> DistillConfig:
    """One stage's distill config: its block of configs/demo/*.yaml plus what this run decides
    (output folder, the fixed views as data kept whole, the teachers, Stage 3's student.init)."""
    data = {
        "sources": [{"name": "demo_views", "type": "views", "path": str(out / "views.safetensors")}],
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
    return load_config(None, [f"output_dir={out / name}", f"train.threads={s.threads}"], mapping=mapping)


def expert_specs(s: DemoSettings, out: Path) -> dict[str, Any]:
    """The two experts as teacher specs (the converted EfficientNet weights live in out/experts)."""
    weights = convert_effnet_lite0(out / "experts" / "effnet_lite0.safetensors")
    ocr = _spec_dict(ocr_teacher_spec(), s.ocr_resolution)
    ocr["kwargs"]["threads"] = s.threads
    return {"effnet": _spec_dict(effnet_teacher_spec(weights), s.effnet_resolution), "ocr": ocr}


def _direct_job(cfg: DistillConfig, source: PrecomputedTargets, out: Path) -> None:
    """The ablation (both experts -> ViT-T directly), in its own single-thread process."""
    set_threads(cfg.train.threads)
    t = time.perf_counter()
    Distiller(cfg, source=source).train()
    (out / "direct" / "time.json").write_text(json.dumps({"seconds": round(time.perf_counter() - t, 1)}))


def _start_direct(cfg: DistillConfig, source: PrecomputedTargets, out: Path) -> Any:
    """Run the direct ablation beside Stages 1-3: two single-thread processes use both cores.

    Each process is single-threaded with its own seeds, so the result does not depend on the
    scheduling. fork shares the views and targets copy-on-write (no pickling, no files).
    """
    import multiprocessing as mp

    job = mp.get_context("fork").Process(target=_direct_job, args=(cfg, source, out), daemon=True)
    job.start()
    return job


def _join_direct(job: Any, out: Path) -> torch.nn.Module:
    job.join()
    if job.exitcode != 0:
        raise EupeError(
            f"the direct ablation process failed (exit code {job.exitcode}); see its output above"
        )
    return create_model(str(out / "direct" / "final"))


def run_demo(output_dir: str | os.PathLike = "demo-output", *, quick: bool = False) -> dict[str, Any]:
    """Run the whole demo into `output_dir`; returns the results.json content."""
    s, blocks = load_demo(quick)
    out = Path(output_dir)
    if (out / "results.json").exists() or (out / "stage1").exists():
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
    pool = D.training_pool(splits, s.pool_size, s.seed, D.PoolSettings(size=224))
    views = D.make_views(pool, s.views_per_image, s.view_side, s.seed)
    save_file({"views": views}, str(out / "views.safetensors"))
    side = s.bench_side
    sets = {
        "knn": D.knn_set(splits, side),
        "text_train": _images_and_regions(D.text_set(splits, s.text_train, seed=s.seed + 1000, size=side)),
        "text_test": _images_and_regions(D.text_set(splits, s.text_test, seed=s.seed, size=side)),
        "homography": D.homography_set(splits, s.homographies, s.seed, size=side),
        "graf": D.graf_pair(320, 256),
    }
    stage1 = stage_config(s, blocks["stage1"], out, "stage1", expert_specs(s, out))
    # the ablation trains in a second process without a bar of its own (the evaluations bar waits for it)
    direct_cfg = stage_config(
        s, blocks["direct"], out, "direct", dict(stage1.teachers), train={"progress": False}
    )
    experts = LiveTeachers(stage1, torch.device("cpu")).teachers
    t = lap("data", t0)

    # the experts run once, over every view, at their training-target sides
    sides = {"effnet": s.effnet_resolution, "ocr": s.ocr_resolution}
    expert_targets = PrecomputedTargets.compute(experts, sides, views)
    t = lap("expert_targets", t)

    job = _start_direct(direct_cfg, expert_targets, out)
    Distiller(stage1, source=expert_targets).train()
    t = lap("stage1", t)

    proxy_teacher = {
        "proxy": {"backend": "eupe", "checkpoint": str(out / "stage1" / "final"), "resolution": 64}
    }
    stage2 = stage_config(s, blocks["stage2"], out, "stage2", proxy_teacher)
    proxy = LiveTeachers(stage2, torch.device("cpu"))
    proxy_targets = PrecomputedTargets.compute(proxy.teachers, proxy.sides, views)
    t = lap("proxy_targets", t)
    Distiller(stage2, source=proxy_targets).train()
    t = lap("stage2", t)
    student_init = {"student": {"init": str(out / "stage2" / "final")}}
    Distiller(stage_config(s, blocks["stage3"], out, "stage3", proxy_teacher, **student_init)).train()
    t = lap("stage3", t)

    proxy_model = create_model(str(out / "stage1" / "final"))
    student = create_model(str(out / "stage3" / "final"))
    models: dict[str, bench.Featurizer] = {  # teachers at their native sides
        "teacher_effnet": lambda x: experts["effnet"](x, EFFNET_RESOLUTION),
        "teacher_ocr": lambda x: experts["ocr"](x, OCR_RESOLUTION),
        "proxy": bench.encoder_featurizer(proxy_model, s.eval_resolution),
        "eupe_vitt16": bench.encoder_featurizer(student, s.eval_resolution),
    }
    scores = {}
    bar = tqdm(MODEL_NAMES, desc="demo evaluations")
    for name in bar:
        if name == "direct_vitt16":  # evaluated last: its process may still be training
            bar.set_postfix_str("waiting for the direct ablation")
            direct = _join_direct(job, out)
            timings["direct (parallel process)"] = json.loads((out / "direct" / "time.json").read_text())[
                "seconds"
            ]
            models[name] = bench.encoder_featurizer(direct, s.eval_resolution)
        scores[name] = evaluate(models[name], sets, s)
    generalization = expert_fit(
        {
            "proxy": (proxy_model, stage1.students["student"].resolution, out / "stage1"),
            "direct_vitt16": (direct, direct_cfg.students["student"].resolution, out / "direct"),
        },
        experts,
        expert_targets.norm,
        {
            "training views": views[:128].float().div(255),
            "kNN cut-outs": bench.to01(sets["knn"][0]),
            "text photos": bench.to01(sets["text_test"][0]),
        },
    )
    t = lap("evaluations", t)

    figures.loss_curves({n: out / n for n in STAGES}, out / "loss_curves.png")
    figures.radar({n: {m: r[m] for m in METRICS} for n, r in scores.items()}, out / "radar.png")
    pca_images = np.stack(
        [sets["text_test"][0][0], sets["text_test"][0][1], sets["knn"][0][0], sets["homography"][0][0]]
    )
    figures.pca_grid(models, pca_images, out / "pca.png")
    lap("figures", t)
    timings["total"] = round(time.perf_counter() - t0, 1)
    results = {
        "models": {n: {m: r[m] for m in METRICS} for n, r in scores.items()},
        "timings_s": timings,
        "machine": machine,
    }
    details = {
        "models": scores,
        "expert_fit": generalization,
        "settings": {
            "demo": dataclasses.asdict(s),
            "stages": {n: OmegaConf.to_container(OmegaConf.load(out / n / "config.yaml")) for n in STAGES},
        },
        "quick": quick,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=1) + "\n")
    write_report(out, results, details)
    return results
