"""`eupe demo`: the EUPE recipe in miniature (STATUS: first end-to-end wiring, untuned).

    data -> Stage 1 (EfficientNet-Lite0 + PP-OCRv4 det -> proxy) -> Stage 2 (proxy -> ViT-T, fixed
    resolution) -> Stage 3 (multi-resolution) ; ablation: both experts -> ViT-T directly, same total
    steps ; evaluations of every model on the three demo benchmarks -> results.json + report.md

Each stage is a normal `eupe distill` run (its config.yaml, metrics.jsonl and final/ are in the
output folder), configured from `DemoSettings`. What is NOT done yet (see docs/demo.md): a
teacher-feature cache pass, and tuning the budget so that `eupe demo` meets its 15-minute target
and its accuracy targets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm

from ..errors import ConfigError
from . import bench, figures
from . import data as D
from .assets import make_splits
from .experts import convert_effnet_lite0, effnet_teacher_spec, ocr_teacher_spec

MODEL_NAMES = ("teacher_effnet", "teacher_ocr", "proxy", "eupe_vitt16", "direct_vitt16")


@dataclass
class DemoSettings:
    """Every number of a demo run (saved to demo_settings.json in the output folder)."""

    seed: int = 0
    pool_size: int = 1200
    pool_side: int = 224
    effnet_resolution: int = 160  # multiple of 32; the experts run live every step, so small
    ocr_resolution: int = 160  # multiple of 16
    proxy: str = "eupe_vits16"
    proxy_resolution: int = 128
    student: str = "eupe_vitt16"
    student_resolution: int = 128
    pyramid: list[int] = field(default_factory=lambda: [96, 128, 160])
    steps: tuple[int, int, int] = (150, 150, 50)  # Stages 1, 2, 3; the direct ablation gets the sum
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 10
    head_dim: int = 512
    norm_batches: int = 4
    threads: int = 0
    eval_resolution: int = 128  # students' input side in the benchmarks
    knn_k: int = 1
    text_train: int = 96
    text_test: int = 48
    homographies: int = 24


def quick_settings() -> DemoSettings:
    """`--quick`: the same pipeline on less data and fewer steps (CI smoke run)."""
    return DemoSettings(
        pool_size=96,
        steps=(8, 8, 4),
        batch=8,
        norm_batches=2,
        pyramid=[96, 128],
        text_train=24,
        text_test=12,
        homographies=6,
    )


def _images_and_regions(text_set: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The text benchmark scores text *regions* (line boxes): glyph strokes are finer than a patch."""
    images, _glyphs, regions = text_set
    return images, regions


def _write_pool(images: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def _stage_config(
    s: DemoSettings,
    out: Path,
    name: str,
    teachers: dict[str, Any],
    student: dict[str, Any],
    steps: int,
    **extra: Any,
) -> Path:
    """Write a distill config YAML for one stage (so the run folder documents every number)."""
    cfg = {
        "output_dir": str(out / name),
        "seed": s.seed,
        "stage": "fixed",
        "teachers": teachers,
        "student": student,
        "heads": {"hidden_dim": s.head_dim},
        "norm": {"batches": s.norm_batches},
        "train": {
            "max_steps": steps,
            "log_every": max(1, steps // 20),
            "checkpoint_every": steps,
            "keep_checkpoints": 1,
            "global_batch": s.batch,
            "lr": s.lr,
            "warmup_steps": min(s.warmup, steps),
            "device": "cpu",
            "threads": s.threads,
        },
        "data": {
            "sources": [{"name": "demo_pool", "type": "folder", "path": str(out / "data" / "pool")}],
            "curated_prob": 0.0,
        },
        **extra,
    }
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return path


def _spec_dict(spec: Any, resolution: int) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["resolution"] = resolution
    d["mean"], d["std"] = list(d["mean"]), list(d["std"])
    return d


def _distill(path: Path) -> Path:
    from ..distill.config import load_config
    from ..distill.trainer import distill

    return distill(load_config(path))


def evaluate(model: bench.Featurizer, sets: dict[str, Any], s: DemoSettings) -> dict[str, float]:
    """The three demo benchmarks for one frozen model."""
    knn = bench.knn_accuracy(model, *sets["knn"], k=s.knn_k)
    text = bench.text_iou(model, sets["text_train"], sets["text_test"], seed=s.seed)
    dense = bench.pck(model, *sets["homography"], graf=sets["graf"])
    return {
        "knn": knn,
        "text_iou": text,
        "pck": dense["pck"],
        "pck_graf": dense.get("pck_graf", float("nan")),
    }


def _report(out: Path, results: dict[str, Any]) -> None:
    metrics = ("knn", "text_iou", "pck", "pck_graf")
    rows = results["models"]
    best = {m: max(r[m] for r in rows.values()) for m in metrics}
    lines = [
        "# eupe demo report",
        "",
        "STATUS: first end-to-end wiring; settings untuned (see docs/demo.md).",
        "",
        "| model | kNN acc | text IoU | PCK@0.1 | PCK@0.1 graf1->3 |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        cells = [f"**{r[m]:.3f}**" if r[m] == best[m] else f"{r[m]:.3f}" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "![radar](radar.png)",
        "",
        "![PCA of patch tokens](pca.png)",
        "",
        "![loss curves](loss_curves.png)",
    ]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items())]
    lines += ["", f"Machine: {results['machine']}"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def run_demo(output_dir: str | os.PathLike = "demo-output", quick: bool = False) -> dict[str, Any]:
    """Run the whole demo into `output_dir`; returns the results.json content."""
    s = quick_settings() if quick else DemoSettings()
    out = Path(output_dir)
    if (out / "results.json").exists() or (out / "stage1").exists():
        raise ConfigError(f"output_dir={str(out)!r} already holds a demo run; pick another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_settings.json").write_text(json.dumps(dataclasses.asdict(s), indent=1) + "\n")
    if s.threads:
        torch.set_num_threads(s.threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    splits = make_splits(s.seed)
    _write_pool(
        D.training_pool(splits, s.pool_size, s.seed, D.PoolSettings(size=s.pool_side)), out / "data" / "pool"
    )
    sets = {
        "knn": D.knn_set(splits, s.eval_resolution),
        "text_train": _images_and_regions(
            D.text_set(splits, s.text_train, seed=s.seed + 1000, size=s.eval_resolution)
        ),
        "text_test": _images_and_regions(
            D.text_set(splits, s.text_test, seed=s.seed, size=s.eval_resolution)
        ),
        "homography": D.homography_set(splits, s.homographies, s.seed, size=s.eval_resolution),
        "graf": D.graf_pair(160, 128),
    }
    weights = convert_effnet_lite0(out / "experts" / "effnet_lite0.safetensors")
    experts = {
        "effnet": _spec_dict(effnet_teacher_spec(weights), s.effnet_resolution),
        "ocr": _spec_dict(ocr_teacher_spec(), s.ocr_resolution),
    }
    timings["data"] = time.perf_counter() - t0

    s1, s2, s3 = s.steps
    finals: dict[str, Path] = {}
    t = time.perf_counter()
    finals["stage1"] = _distill(
        _stage_config(s, out, "stage1", experts, {"name": s.proxy, "resolution": s.proxy_resolution}, s1)
    )
    timings["stage1"] = time.perf_counter() - t
    proxy_teacher = {
        "proxy": {"backend": "eupe", "checkpoint": str(finals["stage1"]), "resolution": s.proxy_resolution}
    }
    t = time.perf_counter()
    finals["stage2"] = _distill(
        _stage_config(
            s, out, "stage2", proxy_teacher, {"name": s.student, "resolution": s.student_resolution}, s2
        )
    )
    timings["stage2"] = time.perf_counter() - t
    t = time.perf_counter()
    finals["stage3"] = _distill(
        _stage_config(
            s, out, "stage3", proxy_teacher, {"name": s.student, "init": str(finals["stage2"])}, s3,
            stage="pyramid", pyramid=list(s.pyramid),
        )
    )  # fmt: skip
    timings["stage3"] = time.perf_counter() - t
    t = time.perf_counter()
    finals["direct"] = _distill(
        _stage_config(
            s, out, "direct", experts, {"name": s.student, "resolution": s.student_resolution}, s1 + s2 + s3
        )
    )
    timings["direct"] = time.perf_counter() - t

    from ..models import create_model
    from ..teachers import build_teacher_from_spec

    models: dict[str, bench.Featurizer] = {
        "teacher_effnet": build_teacher_from_spec("effnet", experts["effnet"], seed=s.seed),
        "teacher_ocr": build_teacher_from_spec("ocr", experts["ocr"], seed=s.seed),
        "proxy": bench.encoder_featurizer(create_model(str(finals["stage1"])), s.eval_resolution),
        "eupe_vitt16": bench.encoder_featurizer(create_model(str(finals["stage3"])), s.eval_resolution),
        "direct_vitt16": bench.encoder_featurizer(create_model(str(finals["direct"])), s.eval_resolution),
    }
    t = time.perf_counter()
    results_models = {}
    for name in tqdm(MODEL_NAMES, desc="demo evaluations"):
        results_models[name] = evaluate(models[name], sets, s)
    timings["evaluations"] = time.perf_counter() - t
    results = {
        "models": results_models,
        "timings_s": timings,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "quick": quick,
        "status": "first wiring: untuned settings",
    }
    t = time.perf_counter()
    figures.loss_curves(
        {n: out / n for n in ("stage1", "stage2", "stage3", "direct")}, out / "loss_curves.png"
    )
    figures.radar(results_models, out / "radar.png")
    pca_images = np.stack(
        [sets["text_test"][0][0], sets["text_test"][0][1], sets["knn"][0][0], sets["homography"][0][0]]
    )
    figures.pca_grid(models, pca_images, out / "pca.png")
    timings["figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    _report(out, results)
    return results
