"""The demo's report: the results table, the paper's claim in miniature, how far each stage got
and how well the students' heads predict the experts (`expert_fit`), written to report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distill.loss import teacher_loss
from ..models.encoder import EncoderOutput
from ..models.heads import TeacherHeads
from . import bench
from .routes import ROUTES

METRICS = ("knn", "text_iou", "pck")  # the claim's three benchmarks
BENCH_KEYS = (*METRICS, "pck_warps", "pck_graf")  # what `pipeline.evaluate` returns
NAMES = {"knn": "k-NN", "text_iou": "text IoU", "pck": "PCK@0.1"}
GOAL = 0.6  # the demo's target: the EUPE student reaches 60% of the best expert on each benchmark


def format_table(
    models: dict[str, dict[str, float]],
    spreads: dict[str, dict[str, float]] | None = None,
    sides: dict[str, int] | None = None,
) -> str:
    """The results table as markdown, best of each column in bold, "mean +- std" where a model has
    a spread over seeds, and the side each model was scored at (`sides`, where given)."""
    cols = BENCH_KEYS
    best = {m: max(r[m] for r in models.values()) for m in cols}
    side = "| side px " if sides else ""
    lines = [
        f"| model {side}| kNN acc | text IoU | PCK@0.1 (pooled) | PCK warps | PCK graf1->3 |",
        "|---|---|---|---|---|---|" + ("---|" if sides else ""),
    ]
    for name, r in models.items():
        cells = []
        for m in cols:
            cell = f"{r[m]:.3f}"
            sd = (spreads or {}).get(name, {}).get(m, 0.0)
            cell += f" +- {sd:.3f}" if sd else ""
            cells.append(f"**{cell}**" if r[m] == best[m] else cell)
        first = f"| {name} | {sides[name]} | " if sides else f"| {name} | "
        lines.append(first + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(
    models: dict[str, dict[str, float]], spreads: dict[str, dict[str, float]], student: str
) -> list[str]:
    """One sentence per benchmark: the two routes with their spread over seeds, then the mean."""
    e, d = f"eupe_{student}", f"direct_{student}"
    lines = []
    for m in METRICS:
        lead = "ahead" if models[e][m] > models[d][m] else "behind"
        lines.append(
            f"- {NAMES[m]}: EUPE route {models[e][m]:.3f} +- {spreads[e][m]:.3f} vs direct "
            f"{models[d][m]:.3f} +- {spreads[d][m]:.3f} (EUPE {lead} by {abs(models[e][m] - models[d][m]):.3f})."
        )
    mean_e = float(np.mean([models[e][m] for m in METRICS]))
    mean_d = float(np.mean([models[d][m] for m in METRICS]))
    lines.append(f"- Mean of the three: EUPE route {mean_e:.3f} vs direct {mean_d:.3f}.")
    return lines


def claim_check(
    models: dict[str, dict[str, float]], student: str, mean_spread: dict[str, float] | None = None
) -> list[str]:
    """The demo's goals as lines: the EUPE student vs the best expert on each benchmark (>= 60%),
    and the EUPE route vs the direct route on the mean of the three, by more than one standard
    deviation of either route's seed spread of that mean (`mean_spread`, by model name)."""
    eupe, direct = models[f"eupe_{student}"], models[f"direct_{student}"]
    teachers = [r for n, r in models.items() if n.startswith("teacher_")]
    lines = []
    for m in METRICS:
        best_t = max(r[m] for r in teachers)
        ratio = eupe[m] / best_t if best_t > 0 else float("nan")
        ok = "yes" if ratio >= GOAL else "no"
        lines.append(
            f"- {NAMES[m]}: EUPE {student} {eupe[m]:.3f} = {ratio:.0%} of the best expert ({best_t:.3f}); "
            f">= {GOAL:.0%}: {ok}; direct {direct[m]:.3f} = {direct[m] / best_t:.0%}"
        )
    base = models.get("baseline_position")
    if base is not None:
        lines.append(
            "- The content-free baseline (position only) scores "
            + ", ".join(f"{NAMES[m]} {base[m]:.3f}" for m in METRICS)
            + ": what a benchmark gives for free; the EUPE student is above it by "
            + ", ".join(f"{eupe[m] - base[m]:+.3f}" for m in METRICS)
        )
    wins = sum(eupe[m] > direct[m] for m in METRICS)
    mean_e = float(np.mean([eupe[m] for m in METRICS]))
    mean_d = float(np.mean([direct[m] for m in METRICS]))
    sd = max((mean_spread or {}).get(f"{r}_{student}", 0.0) for r in ROUTES)
    verdict = "yes" if mean_e - mean_d > sd or (not sd and mean_e >= mean_d) else "no"
    lines.append(
        f"- EUPE route >= direct on the mean, by more than one seed standard deviation ({sd:.3f}): "
        f"{verdict} ({mean_e:.3f} vs {mean_d:.3f}, difference {mean_e - mean_d:+.3f}; better on {wins}/3)"
    )
    proxy = models.get("proxy")
    if proxy is not None:
        above = [NAMES[m] for m in METRICS if proxy[m] > direct[m]]
        lines.append(
            f"- The proxy above the direct student on at least two benchmarks: {'yes' if len(above) >= 2 else 'no'} "
            f"({', '.join(above) or 'none'})"
        )
    return lines


def same_side_line(details: dict[str, Any], student: str) -> list[str]:
    """The direct student scored at the EUPE student's side too: how much of the gap is the side."""
    key = next((k for k in details if k.startswith(f"direct_{student}_at_")), None)
    if key is None:
        return []
    d = details[key]
    cells = ", ".join(f"{NAMES[m]} {d['mean'][m]:.3f} +- {d['spread'][m]:.3f}" for m in METRICS)
    mean = float(np.mean([d["mean"][m] for m in METRICS]))
    return [
        f"- For comparison, the direct student scored at {d['resolution']} px (the EUPE student's side, "
        f"which it never trained at): {cells}; mean {mean:.3f}."
    ]


def fit_summary(runs: dict[str, Path], last: int = 10) -> list[str]:
    """How far each stage got: the cosine losses (1 - cos sim) over its last steps, per teacher.

    This is the first thing to read when a student falls short: a stage that ends near 1.0 has not
    learned its teacher; Stage 2 near 0 with a weak proxy copies the proxy's weakness.
    """
    lines = []
    for label, folder in runs.items():
        path = Path(folder) / "metrics.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()][-last:]
        keys = sorted(k for k in rows[0] if k.endswith(("/cls_cos", "/patch_cos")))
        cells = [f"{k[5:]} {np.mean([r[k] for r in rows]):.3f}" for k in keys]
        lines.append(f"- {label} ({rows[-1]['step']} steps): " + ", ".join(cells))
    return lines


@torch.no_grad()
def heldout_cosine(
    out: EncoderOutput, heads: TeacherHeads, target: EncoderOutput, name: str
) -> dict[str, float]:
    """How well a student's adapter head for teacher `name` predicts its normalized `target`.

    `out` is the student's output on the same images. Mean cosine similarity, cls and patches (the
    training loss's terms as similarities). On training views vs held-out images it separates "not
    fitted yet" (both low) from "fitted the pool but does not generalize" (train high, held-out low).
    """
    z_cls, z_patch = heads(out, [name])[name]
    terms = teacher_loss(z_cls, z_patch, tuple(out.grid), target.cls, target.patches, tuple(target.grid))
    return {"cls_cos_sim": 1.0 - float(terms["cls_cos"]), "patch_cos_sim": 1.0 - float(terms["patch_cos"])}


def expert_fit(
    students: dict[str, tuple[torch.nn.Module, int, Path]],
    experts: dict[str, Any],
    norm: Any,
    image_sets: dict[str, torch.Tensor],
) -> dict[str, dict[str, dict[str, float]]]:
    """students[name] = (model, training side, the folder with its heads.safetensors): how well its
    adapter heads predict each expert on training views vs held-out images (`heldout_cosine`),
    {student: {expert/set: sims}}."""
    with torch.inference_mode():  # each expert runs once per image set, for every student
        targets = {
            (expert, where): norm.normalize(expert, fn(images))
            for expert, fn in experts.items()
            for where, images in image_sets.items()
        }
    fit: dict[str, dict[str, dict[str, float]]] = {}
    for name, (model, side, folder) in students.items():
        heads = TeacherHeads.load(folder)
        student = bench.encoder_featurizer(model, side)
        fit[name] = {
            f"{expert}/{where}": heldout_cosine(student(image_sets[where]), heads, y, expert)
            for (expert, where), y in targets.items()
        }
    return fit


def proxy_line(proxy: dict[str, Any], timings: dict[str, float]) -> str:
    """Where the proxy came from and what it cost, beside the per-student costs."""
    where = (
        "the proxy shipped with eupe"
        if proxy["source"] == "shipped"
        else f"a proxy trained here ({proxy['folder']})"
    )
    return (
        f"The proxy: {where}, {proxy['steps']} Stage-1 steps, built once for the family by `{proxy['command']}` "
        f"in {proxy['cpu_seconds'] / 3600:.2f} CPU hours (paid once, as the paper pays Stage 1 once per family); "
        f"one EUPE student then costs {timings.get('eupe_cpu_per_student', float('nan')):.0f} CPU s and one direct "
        f"student {timings.get('direct_cpu_per_student', float('nan')):.0f} CPU s."
    )


def fit_lines(fit: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["| student | expert | images | cls cos sim | patch cos sim |", "|---|---|---|---|---|"]
    for name, rows in fit.items():
        for key, r in rows.items():
            expert, where = key.split("/", 1)
            lines.append(
                f"| {name} | {expert} | {where} | {r['cls_cos_sim']:.3f} | {r['patch_cos_sim']:.3f} |"
            )
    return lines


def outlook(models: dict[str, dict[str, float]], student: str) -> list[str]:
    """What would change the outcome, from what this run measured (docs/demo.md has the numbers)."""
    eupe, direct, proxy = models[f"eupe_{student}"], models[f"direct_{student}"], models["proxy"]
    lines = []
    weak = [NAMES[m] for m in METRICS if proxy[m] < direct[m]]
    if weak:
        lines.append(
            f"- The proxy is below the direct student on {', '.join(weak)}: Stage 2 can only pass on what "
            "Stage 1 gave it. A proxy trained longer (it is trained once for a whole family: "
            "`eupe demo build-proxy --hours H`) raises that ceiling."
        )
    lines += [
        "- More student steps: `eupe demo --sweep` trains both routes at 1x, 2x and 4x this budget and plots "
        "where they cross; with `--proxy-dir` of a build it also trains EUPE students from the proxy at "
        "1/8, 1/4 and 1/2 of its training (docs/demo.md).",
        "- More distinct images: the pool holds 340 cut-outs of the kNN classes; each view is seen many "
        "times, so held-out objects are where the students fall short (expert fit, below).",
    ]
    if float(np.mean([eupe[m] for m in METRICS])) < float(np.mean([direct[m] for m in METRICS])):
        lines.append(
            "- Teachers much larger than the student, as in the paper (0.3-1.9B vs 5-86M): that is the gap "
            "a proxy exists to bridge."
        )
    return lines


def write_report(out: Path, results: dict[str, Any], details: dict[str, Any]) -> None:
    """report.md: the result in one line per benchmark, the table, the goals, the figures, how far
    each stage got, what would change the outcome, timings, machine."""
    t = results["timings_s"]
    student, models = details["student"], details["models"]
    n = len(results["seeds"])
    lines = [
        "# eupe demo report"
        + (" (--quick smoke run: too few steps to mean anything)" if details["quick"] else ""),
        "",
        f"The EUPE route (experts -> proxy -> {student}) against the direct route (experts -> {student}, "
        f"the same student steps), mean +- standard deviation over {n} seed(s):",
        "",
        *headline(models, details["spread"], student),
        "",
        format_table(models, details["spread"], details["resolution"]),
        "",
        "kNN: leave-one-out 1-NN (cosine on cls) over held-out Tux Paint cut-outs, 17 categories.",
        "text IoU: linear probe on frozen patch tokens, text-line regions at 56x56.",
        "PCK@0.1: nearest-patch matching on the points the warp moves beyond the threshold, pooled",
        "over random homography warps of held-out photos and graf1->graf3 (also shown apart).",
        "baseline_position: content-free features (patch position only). Every model is scored at the side "
        "it was trained for (`side px`): the experts at their native sides, the proxy at its Stage-1 side, the "
        "EUPE student at the top of Stage 3's pyramid, the direct student at its training side. The teachers "
        "and the proxy are trained or run once, so they have no spread.",
        "",
        proxy_line(results["proxy"], t),
        "",
        "## Goals",
        "",
        *claim_check(models, student, {n: v["spread"] for n, v in details["mean_of_three"].items()}),
        *same_side_line(details, student),
        "",
        "![radar](radar.png)",
        "",
        "![PCA of patch tokens](pca.png)",
        "",
        "![loss curves](loss_curves.png)",
        "",
        *(
            [
                "## Tuning (`eupe demo --search`, configs/demo/search.json)",
                "",
                *search_lines(details["search"]),
                "",
            ]
            if details.get("search")
            else []
        ),
        "## What would change the outcome",
        "",
        *outlook(models, student),
        "",
        "How far each stage got (1 - cosine similarity, mean of the last 10 steps; 1.0 = not learned):",
        "",
        *fit_summary({k: Path(v) for k, v in details["fit_summary_runs"].items()}),
        "",
        "Do the students generalize? Cosine similarity of each adapter head's prediction with the",
        "normalized expert output, on training views and on held-out benchmark images (1.0 = perfect;",
        "a big drop from training views to held-out images means the pool is too small):",
        "",
        *fit_lines(details["expert_fit"]),
        "",
        "## Timings",
        "",
        "Wall-clock seconds per phase (two processes: the second trains the direct runs, then shares",
        "the EUPE runs), and CPU seconds per route: `proxy_targets_cpu` is the proxy's Stage-2 targets,",
        "computed once and shared by every seed; `<route>_cpu_per_student` is one student's training.",
        "The proxy's own training is paid once per family (above).",
        "",
        ", ".join(f"{k} {v:.1f}" for k, v in t.items()),
        "",
        "## Machine",
        "",
        ", ".join(f"{k}: {v}" for k, v in results["machine"].items()),
        "",
        "## Settings",
        "",
        "Data and benchmarks (each stage's full distill config is its `config.yaml`):",
        "",
        "```",
        json.dumps(details["settings"]["demo"]),
        "```",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def search_lines(search: dict[str, Any]) -> list[str]:
    """The search as markdown: one row per route and setting, the chosen one in bold."""
    lines = [
        "Both routes get the same small search (seed 0, the headline budget), scored by the "
        f"{search['criterion']} (never the benchmark sets):",
        "",
        "| route | lr | head width | kNN | text IoU | PCK | mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for route, r in search["routes"].items():
        for row in r["runs"].values():
            chosen = (row["lr"], row["head"]) == (r["chosen"]["lr"], r["chosen"]["head"])
            cells = [f"{row['scores'][m]:.3f}" for m in METRICS] + [f"{row['mean']:.3f}"]
            if chosen:
                cells = [f"**{c}**" for c in cells]
            lines.append(f"| {route} | {row['lr']:g} | {row['head']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Chosen: "
        + "; ".join(
            f"{route} lr {r['chosen']['lr']:g}, head {r['chosen']['head']}"
            for route, r in search["routes"].items()
        ),
    ]
    return lines
