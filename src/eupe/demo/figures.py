"""The demo report's figures: loss curves per stage, a radar of the three benchmarks, a PCA grid.

All three are plain matplotlib (Agg) PNGs next to report.md; nothing here trains or evaluates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .bench import Featurizer, to01

METRICS = ("knn", "text_iou", "pck")
LABELS = {"knn": "kNN acc (semantic)", "text_iou": "text IoU (OCR)", "pck": "PCK@0.1 (dense)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(run_dirs: dict[str, Path], path: Path) -> Path:
    """Total loss vs step of each distill run (from its metrics.jsonl)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for name, run in run_dirs.items():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "loss" in r]
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def radar(models: dict[str, dict[str, float]], path: Path) -> Path:
    """One polygon per model over the three benchmarks (raw scores, all in [0, 1])."""
    plt = _plt()
    angles = np.linspace(0, 2 * np.pi, len(METRICS), endpoint=False).tolist()
    fig = plt.figure(figsize=(5, 5), dpi=110)
    ax = fig.add_subplot(polar=True)
    for name, r in models.items():
        vals = [r[m] for m in METRICS]
        ax.plot(angles + angles[:1], vals + vals[:1], label=name, linewidth=1.5)
        ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels([LABELS[m] for m in METRICS], fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower left", bbox_to_anchor=(-0.15, -0.2), fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@torch.inference_mode()
def pca_grid(models: dict[str, Featurizer], images: np.ndarray, path: Path, cell: int = 128) -> Path:
    """Rows: images; columns: input + each model's patch tokens projected on their top-3 PCs as RGB."""
    from ..eval.pca import draw_grid, pca_rgb

    x = to01(images)
    columns = []
    for model in models.values():
        col = []
        for i in range(len(x)):
            out = model(x[i : i + 1])
            rgb, _ = pca_rgb([out.patches[0].float().cpu()])
            col.append(rgb[0].reshape(*out.grid, 3))
        columns.append(col)
    draw_grid(list(x), columns, list(models), path, cell)
    return path


def _steps_axis(ax, steps: list[int], label: str, metric: str) -> None:
    """A benchmark panel against training steps: log-2 x axis ticked at the steps run."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel(label)
    ax.set_title(LABELS[metric], fontsize=9)
    ax.grid(alpha=0.3)


def _save(plt, fig, axes, path: Path) -> Path:
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sweep_plot(sweep: dict, path: Path) -> Path:
    """One panel per benchmark: score against student steps for both routes (error bars: the spread
    over seeds), the experts and the proxy as dashed lines."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(11, 3.4), dpi=110)
    steps = [sweep["student_steps"][str(b)] for b in sweep["budgets"]]
    for ax, m in zip(axes, METRICS):
        for route, rows in sweep["routes"].items():
            ys = [rows[str(b)]["mean"][m] for b in sweep["budgets"]]
            es = [rows[str(b)]["spread"][m] for b in sweep["budgets"]]
            ax.errorbar(steps, ys, yerr=es, marker="o", capsize=3, label=f"{route} route")
        for name, r in {**sweep["teachers"], "proxy": sweep["proxy"]}.items():
            ax.axhline(r[m], linestyle="--", linewidth=0.8, color="gray")
            ax.annotate(name, (steps[0], r[m]), fontsize=6, color="gray", va="bottom")
        _steps_axis(ax, steps, "student steps", m)
    return _save(plt, fig, axes, path)


def proxy_budget_plot(sweep: dict, path: Path) -> Path:
    """One panel per benchmark: the EUPE student (1x student steps) and the proxy itself against the
    proxy's Stage-1 steps (its build checkpoints), the direct route at 1x as a dashed line."""
    plt = _plt()
    budgets = sweep["proxy_budgets"]
    steps = [b["proxy_steps"] for b in budgets.values()]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(11, 3.4), dpi=110)
    for ax, m in zip(axes, METRICS):
        ys = [b["mean"][m] for b in budgets.values()]
        es = [b["spread"][m] for b in budgets.values()]
        ax.errorbar(steps, ys, yerr=es, marker="o", capsize=3, label="EUPE student")
        ax.plot(steps, [b["proxy_scores"][m] for b in budgets.values()], marker="s", label="the proxy")
        ax.axhline(sweep["routes"]["direct"]["1"]["mean"][m], linestyle="--", color="C3", label="direct (1x)")
        _steps_axis(ax, steps, "the proxy's Stage-1 steps", m)
    return _save(plt, fig, axes, path)
