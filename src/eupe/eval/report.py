"""`eupe eval suite`: several evaluations over several models, one Markdown table, one radar plot.

The table follows the paper's Table 1 (models as rows, benchmarks as columns, the best value per
column in bold; lower is better for RMSE). The radar plot follows Figure 1 (left): one axis per
benchmark, each axis scaled from the worst model (inner ring) to the best (outer ring).
Every run keeps its own `results.json` under `<output_dir>/<model>/<task>/`, so an interrupted
suite resumes where it stopped (`skip_existing`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError, EupeError
from .common import RESULTS_FILE, EvalResult, read_result, result_from_dict
from .registry import TASKS, run_task

LOWER_IS_BETTER = {"rmse"}
RAW_SCORES = {"mme_perception"}  # points, not a fraction (MME perception: up to 2000)
VLM_TASKS = ["textvqa_val", "scienceqa_img", "realworldqa", "pope", "gqa", "mme"]


@dataclass
class SuiteModel:
    name: str = ""  # row label; default: the model spec
    model: str = ""
    weights: str | None = None
    # the VLM columns: a LLaVA folder trained with this encoder (`eupe vlm train`'s final/), scored
    # here with `eupe vlm eval`, or an `eupe vlm eval` output folder (its results.json is read)
    vlm: str | None = None


@dataclass
class SuiteVlm:
    tasks: list[str] = field(default_factory=lambda: list(VLM_TASKS))
    limit: int | None = None
    data_dir: str | None = None  # offline benchmark copies (see `eupe vlm eval --data-dir`)
    textvqa_ocr: bool = False
    device: str = "auto"


@dataclass
class SuiteEval:
    task: str = ""
    data: str = ""
    label: str = ""  # column label; default: the benchmark's name (IN1k-KNN, ADE20k, ...)
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class SuiteConfig:
    output_dir: str = "eval_suite"
    models: list[SuiteModel] = field(default_factory=list)
    evals: list[SuiteEval] = field(default_factory=list)
    # applied to every eval that has the key (e.g. device, num_workers); per-eval settings win
    settings: dict[str, Any] = field(default_factory=dict)
    vlm: SuiteVlm = field(default_factory=SuiteVlm)  # read for models that name a `vlm` folder
    skip_existing: bool = True
    title: str = "Evaluation suite"
    # free-form values for ${...} interpolation in the entries above (data paths, weight files)
    paths: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)


def load_suite_config(path: str | Path, overrides: list[str] | None = None) -> SuiteConfig:
    try:
        cfg = OmegaConf.merge(
            OmegaConf.structured(SuiteConfig),
            OmegaConf.load(str(path)),
            OmegaConf.from_dotlist(overrides or []),
        )
        suite: SuiteConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except (OmegaConfBaseException, OSError) as e:
        raise ConfigError(f"{path}: bad suite config ({str(e).splitlines()[0]})") from None
    if not suite.models or not (suite.evals or any(m.vlm for m in suite.models)):
        raise ConfigError(
            f"{path}: a suite needs at least one entry under 'models' and one under 'evals' (or a model's 'vlm')"
        )
    for e in suite.evals:
        if e.task not in TASKS:
            raise ConfigError(f"{path}: unknown task '{e.task}'; choose from {', '.join(TASKS)}")
    for m in suite.models:
        if not m.model:
            raise ConfigError(f"{path}: every model entry needs 'model' (a zoo name, folder or timm name)")
        m.name = m.name or Path(m.model).name
    return suite


def safe_name(name: str) -> str:
    """`name` as one path component (run folders are named after models and benchmarks)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def run_suite(suite: SuiteConfig, vlm_runner: Callable | None = None) -> dict[str, Any]:
    """Run every (model, eval) pair (PCA once over all models); write table.md, radar.png, suite.json.

    `vlm_runner` scores the LLaVA folders of models with a `vlm` entry (the CLI passes
    `eupe.vlm.bench.run_vlm_eval`; the VLM path sits above this package).
    """
    out = Path(suite.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, EvalResult]] = {m.name: {} for m in suite.models}
    columns: list[tuple[str, str]] = []  # (key, label)
    for ev in suite.evals:
        task = TASKS[ev.task]
        key = ev.label or task.label
        known = task.setting_names()
        settings = {**{k: v for k, v in suite.settings.items() if k in known}, **ev.settings}
        if task.multi_model:  # one run over every model (a side-by-side picture), not a column
            run_dir = out / safe_name(ev.task)
            if not (suite.skip_existing and (run_dir / RESULTS_FILE).is_file()):
                run_task(
                    ev.task,
                    model=[m.model for m in suite.models],
                    data=ev.data,
                    weights=[m.weights for m in suite.models],
                    output_dir=run_dir,
                    settings=settings,
                )
            continue
        columns.append((key, key))
        for m in suite.models:
            run_dir = out / safe_name(m.name) / safe_name(key)
            if suite.skip_existing and (run_dir / RESULTS_FILE).is_file():
                results[m.name][key] = read_result(run_dir)
                continue
            try:
                res = run_task(
                    ev.task,
                    model=m.model,
                    data=ev.data,
                    weights=m.weights,
                    output_dir=run_dir,
                    settings=settings,
                )
            except EupeError as e:  # one broken run should not sink the whole table
                res = EvalResult(ev.task, "", None, m.name, ev.data, settings, status=f"error: {e}")
                res.write(run_dir)
            results[m.name][key] = res
    columns += [(c, c) for c in _vlm_columns(suite, out, results, vlm_runner)]
    table = markdown_table(results, [c for c, _ in columns], suite.title)
    (out / "table.md").write_text(table)
    radar_plot(results, [c for c, _ in columns], out / "radar.png", suite.title)
    summary = {
        name: {k: {"value": r.value, "metric": r.metric, "status": r.status} for k, r in row.items()}
        for name, row in results.items()
    }
    (out / "suite.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {"table": str(out / "table.md"), "radar": str(out / "radar.png"), "results": summary}


def _vlm_columns(
    suite: SuiteConfig, out: Path, results: dict[str, dict[str, EvalResult]], vlm_runner: Callable | None
) -> list[str]:
    """Score (or read) each model's LLaVA run on the VLM benchmarks; the columns it adds."""
    columns: list[str] = []
    for m in suite.models:
        if not m.vlm:
            continue
        run_dir = out / safe_name(m.name) / "vlm"
        source = Path(m.vlm) / RESULTS_FILE
        if suite.skip_existing and (run_dir / RESULTS_FILE).is_file():
            source = run_dir / RESULTS_FILE
        if not source.is_file():
            if vlm_runner is None:
                raise ConfigError(f"{m.vlm}: no results.json to read, and no VLM scorer given to run_suite")
            v = suite.vlm
            vlm_runner(
                m.vlm,
                v.tasks,
                run_dir,
                limit=v.limit,
                data_dir=v.data_dir,
                textvqa_ocr=v.textvqa_ocr,
                device=v.device,
            )
            source = run_dir / RESULTS_FILE
        for entry in json.loads(source.read_text()).values():
            r = result_from_dict(entry)
            label = r.extra.get("label") or r.task
            results[m.name][label] = r
            if label not in columns:
                columns.append(label)
    return columns


def _lower_better(results: dict[str, dict[str, EvalResult]], col: str) -> bool:
    return any(row[col].metric in LOWER_IS_BETTER for row in results.values() if col in row)


def format_value(value: float, metric: str, precise: bool = False) -> str:
    """A metric's value as shown: fractions in %, RMSE in metres, raw scores (MME) in points."""
    if metric in LOWER_IS_BETTER:
        return f"{value:.4f} m" if precise else f"{value:.3f}"
    if metric in RAW_SCORES:
        return f"{value:.1f}" if precise else f"{value:.0f}"
    return f"{100 * value:.2f}%" if precise else f"{100 * value:.1f}"


def _fmt(r: EvalResult) -> str:
    if r.value is None:
        return "n/a" if r.status.startswith("not supported") else "error"
    return format_value(r.value, r.metric)


def markdown_table(results: dict[str, dict[str, EvalResult]], cols: list[str], title: str = "") -> str:
    """Models as rows, benchmarks as columns; the best value per column in bold."""
    header = ["Model"]
    for c in cols:
        metric = next((row[c].metric for row in results.values() if c in row and row[c].metric), "")
        header.append(f"{c} {metric} {'↓' if _lower_better(results, c) else '↑'}".replace("  ", " "))
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best: dict[str, float] = {}
    for c in cols:
        vals = [row[c].value for row in results.values() if c in row and row[c].value is not None]
        if vals:
            best[c] = min(vals) if _lower_better(results, c) else max(vals)
    notes = set()
    for name, row in results.items():
        cells = [name]
        if any(r.extra.get("model_info", {}).get("random_init") for r in row.values()):
            cells[0] += " †"
            notes.add("† random-initialised weights (no checkpoint given)")
        for c in cols:
            r = row.get(c)
            if r is None:
                cells.append("")
                continue
            text = _fmt(r)
            if r.value is not None and c in best and math.isclose(r.value, best[c], rel_tol=0, abs_tol=1e-12):
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy, mIoU, PCK and F1 in %; RMSE in metres; MME in points. n/a: not supported by the model.",
    ]
    lines += sorted(notes)
    return "\n".join(lines) + "\n"


def radar_plot(
    results: dict[str, dict[str, EvalResult]], cols: list[str], path: Path, title: str = ""
) -> None:
    """One axis per benchmark, scaled from the worst model (0.25) to the best (1.0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # an axis where no model has a number (e.g. zero-shot for encoders without text heads) says nothing
    cols = [c for c in cols if any(c in row and row[c].value is not None for row in results.values())]
    if not cols:
        return
    n = len(cols)
    angles = [2 * math.pi * i / n for i in range(n)]
    fig = plt.figure(figsize=(6.4, 6.4), dpi=110)
    ax = fig.add_subplot(111, polar=True)
    ax.set_theta_offset(math.pi / 2)
    ax.set_theta_direction(-1)
    labels = []
    for c in cols:
        vals = [row[c].value for row in results.values() if c in row and row[c].value is not None]
        best = (min(vals) if _lower_better(results, c) else max(vals)) if vals else None
        metric = next((row[c].metric for row in results.values() if c in row and row[c].metric), "")
        shown = "" if best is None else format_value(best, metric)
        labels.append(f"{c}\n(best {shown})" if shown else c)
    colors = plt.get_cmap("tab10")
    for k, (name, row) in enumerate(results.items()):
        radii = []
        for c in cols:
            vals = [r[c].value for r in results.values() if c in r and r[c].value is not None]
            v = row[c].value if c in row else None
            if v is None or not vals:
                radii.append(0.0)
                continue
            lo, hi = min(vals), max(vals)
            frac = 1.0 if hi == lo else (v - lo) / (hi - lo)
            if _lower_better(results, c):
                frac = 1.0 - frac if hi != lo else 1.0
            radii.append(0.25 + 0.75 * frac)
        ax.plot(angles + angles[:1], radii + radii[:1], color=colors(k % 10), linewidth=2, label=name)
        ax.fill(angles + angles[:1], radii + radii[:1], color=colors(k % 10), alpha=0.12)
    ax.set_xticks(angles)
    ax.set_xticklabels(labels, fontsize=9)
    ax.tick_params(axis="x", pad=16)  # keep the axis labels clear of the outer ring
    ax.set_ylim(0, 1.05)
    ax.set_yticks([0.25, 0.625, 1.0])
    ax.set_yticklabels(["worst", "", "best"], fontsize=7, color="grey")
    ax.legend(
        loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(3, len(results)), fontsize=9, frameon=False
    )
    if title:
        ax.set_title(title, pad=24)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# how a number was obtained, where a task has a choice (knn's scoring, the probes' backbone mode and
# selection): the one-line report repeats it, so two numbers are not compared across protocols unseen
PROTOCOL_KEYS = ("protocol", "backbone_mode", "select")


def format_result(r: EvalResult) -> str:
    if r.value is None:
        return f"{r.task} {r.model}: {r.status}"
    line = f"{r.task} {r.model} on {r.dataset}: {r.metric} = {format_value(r.value, r.metric, precise=True)}"
    notes = [f"{k}={r.extra[k]}" for k in PROTOCOL_KEYS if k in r.extra]
    if r.extra.get("select") == "best":
        notes[-1] += f" (step {r.extra['selected_step']})"
    return f"{line} [{', '.join(notes)}]" if notes else line
