"""The demo's studies beside the headline run: `eupe demo --sweep` (both routes at several student
budgets, and EUPE students from the proxy's build checkpoints) and `eupe demo --search` (the same lr
x head-width search for both routes, on validation sets), each aggregated into JSON, markdown and
a plot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .report import METRICS, search_lines
from .routes import ROUTES, Run, mean_and_spread, stage_block


def sweep_table(sweep: dict[str, Any]) -> str:
    """sweep.json as markdown: one row per budget and route."""
    lines = [
        "| budget | student steps | route | kNN acc | text IoU | PCK@0.1 | mean | CPU s per student |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in sweep["budgets"]:
        for route, r in sweep["routes"].items():
            row = r[str(b)]
            cells = [
                f"{row['mean'][m]:.3f}" + (f" +- {row['spread'][m]:.3f}" if row["spread"][m] else "")
                for m in METRICS
            ]
            mean = float(np.mean([row["mean"][m] for m in METRICS]))
            lines.append(
                f"| {b}x | {sweep['student_steps'][str(b)]} | {route} | "
                + " | ".join(cells)
                + f" | {mean:.3f} | {row['cpu_s']:.0f} |"
            )
    return "\n".join(lines)


def proxy_budget_lines(sweep: dict[str, Any]) -> list[str]:
    """The proxy's own budget: EUPE students (1x student steps) from the proxy's build checkpoints."""
    budgets = sweep["proxy_budgets"]
    if not budgets:
        return [
            "The proxy's own budget is not swept: the shipped proxy has no build checkpoints. Build one "
            "(`eupe demo build-proxy --output-dir pb`) and pass `--proxy-dir pb`.",
            "",
        ]
    direct = sweep["routes"]["direct"]["1"]["mean"]
    lines = [
        "## The proxy's own budget",
        "",
        "EUPE students at 1x student steps, each from the proxy at a checkpoint of its one build "
        "(the same cosine schedule, stopped early), against the direct route at 1x "
        f"(kNN / text IoU / PCK {' / '.join(f'{direct[m]:.3f}' for m in METRICS)}, mean "
        f"{np.mean([direct[m] for m in METRICS]):.3f}):",
        "",
        "| proxy checkpoint | proxy steps | proxy kNN / text IoU / PCK | EUPE student kNN | text IoU | PCK@0.1 | mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, b in budgets.items():
        p = " / ".join(f"{b['proxy_scores'][m]:.3f}" for m in METRICS)
        cells = [
            f"{b['mean'][m]:.3f}" + (f" +- {b['spread'][m]:.3f}" if b["spread"][m] else "") for m in METRICS
        ]
        mean = float(np.mean([b["mean"][m] for m in METRICS]))
        label = "1" if name == "1" else name.replace("_", "/")
        lines.append(f"| {label} | {b['proxy_steps']} | {p} | " + " | ".join(cells) + f" | {mean:.3f} |")
    return [*lines, "", "![the proxy's budget](sweep_proxy.png)", ""]


def write_sweep(out: Path, sweep: dict[str, Any]) -> None:
    """sweep.json, sweep.md (the table) and sweep.png (each benchmark against the budget)."""
    from .figures import proxy_budget_plot, sweep_plot

    (out / "sweep.json").write_text(json.dumps(sweep, indent=1) + "\n")
    references = {**sweep["teachers"], "proxy": sweep["proxy"]}
    sweep_plot(sweep, out / "sweep.png")
    if sweep["proxy_budgets"]:
        proxy_budget_plot(sweep, out / "sweep_proxy.png")
    lines = [
        "# eupe demo --sweep",
        "",
        "Both routes at each budget (a multiple of the student stages' steps), mean over "
        f"{len(sweep['seeds'])} seed(s). The proxy is trained once and shared by every budget.",
        "",
        sweep_table(sweep),
        "",
        "References (kNN / text IoU / PCK): "
        + "; ".join(f"{n} " + " / ".join(f"{r[m]:.3f}" for m in METRICS) for n, r in references.items()),
        "",
        "![sweep](sweep.png)",
        "",
        *proxy_budget_lines(sweep),
        "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in sweep["timings_s"].items()),
        "",
        "Machine: " + ", ".join(f"{k}: {v}" for k, v in sweep["machine"].items()),
    ]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")


def sweep_results(
    out: Path,
    budgets: list[int],
    blocks: dict[str, Any],
    runs: list[Run],
    per_run: dict[Run, dict[str, Any]],
    teachers: dict[str, dict[str, float]],
    proxy: dict[str, Any],
    timings: dict[str, float],
    t0: float,
    machine: dict[str, Any],
) -> dict[str, Any]:
    """Aggregate the sweep's runs (mean and spread over seeds per budget and route, and per proxy
    checkpoint), write sweep.json, sweep.md, sweep.png (and sweep_proxy.png), return the sweep.

    `proxy`: {"scores": the finished proxy's, "budgets": {checkpoint: its scores}, "record":
    results.json's `proxy`, "steps": {checkpoint or "1": its Stage-1 steps}}."""
    seeds = sorted({r.seed for r in runs})
    steps = {
        str(b): sum(stage_block(blocks, st, Run("eupe", 0, b))["train"]["max_steps"] for st in ROUTES["eupe"])
        for b in budgets
    }

    def aggregate(chosen: list[Run]) -> dict[str, Any]:
        rows = [per_run[r] for r in chosen]
        mean, spread = mean_and_spread([r["scores"] for r in rows])
        return {"mean": mean, "spread": spread, "cpu_s": float(np.mean([r["cpu_s"] for r in rows]))}

    routes = {
        route: {
            str(b): aggregate([r for r in runs if r.route == route and r.budget == b and not r.proxy])
            for b in budgets
        }
        for route in ROUTES
    }
    proxy_budgets: dict[str, Any] = {}
    if proxy["budgets"]:
        for name in [*proxy["budgets"], "1"]:
            chosen = [
                r
                for r in runs
                if r.route == "eupe" and r.budget == 1 and r.proxy == ("" if name == "1" else name)
            ]
            proxy_budgets[name] = {
                "proxy_steps": proxy["steps"][name],
                "proxy_scores": proxy["scores"] if name == "1" else proxy["budgets"][name],
                **aggregate(chosen),
            }
    timings["total"] = round(time.perf_counter() - t0, 1)
    sweep = {
        "budgets": list(budgets),
        "student_steps": steps,
        "seeds": seeds,
        "routes": routes,
        "teachers": teachers,
        "proxy": proxy["scores"],
        "proxy_build": proxy["record"],
        "proxy_budgets": proxy_budgets,
        "timings_s": timings,
        "machine": machine,
    }
    write_sweep(out, sweep)
    return sweep


def search_results(
    out: Path,
    runs: list[Run],
    per_run: dict[Run, dict[str, Any]],
    blocks: dict[str, Any],
    proxy: dict[str, Any],
    timings: dict[str, float],
    t0: float,
    machine: dict[str, Any],
) -> dict[str, Any]:
    """`eupe demo --search`: every (lr, head width) of both routes on the validation sets, the best
    of each route by the mean of the three; writes search.json and search.md, returns the search."""
    routes: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        rows = {}
        for r in (r for r in runs if r.route == route):
            scores = per_run[r]["scores"]
            rows[f"lr={r.lr:g} head={r.head}"] = {
                "lr": r.lr,
                "head": r.head,
                "scores": {m: scores[m] for m in METRICS},
                "mean": float(np.mean([scores[m] for m in METRICS])),
                "cpu_s": per_run[r]["cpu_s"],
            }
        best = max(rows, key=lambda k: rows[k]["mean"])
        routes[route] = {"runs": rows, "chosen": {"lr": rows[best]["lr"], "head": rows[best]["head"]}}
    timings["total"] = round(time.perf_counter() - t0, 1)
    first = {route: stage_block(blocks, ROUTES[route][0], runs[0]) for route in ROUTES}
    search = {
        "criterion": "mean of kNN / text IoU / PCK on validation sets from the training pool's material",
        "student_steps": {
            route: sum(blocks[st]["train"]["max_steps"] for st in stages) for route, stages in ROUTES.items()
        },
        "config_before": {
            r: {"lr": b["train"]["lr"], "head": b["heads"]["hidden_dim"]} for r, b in first.items()
        },
        "routes": routes,
        "proxy": proxy,
        "timings_s": timings,
        "machine": machine,
    }
    (out / "search.json").write_text(json.dumps(search, indent=1) + "\n")
    lines = ["# eupe demo --search", "", *search_lines(search)]
    (out / "search.md").write_text("\n".join(lines) + "\n")
    return search
