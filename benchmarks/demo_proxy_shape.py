"""Choose the demo proxy's shape by measurement: score finished `eupe demo build-proxy` folders on
the *validation* sets (`pipeline.benchmark_sets(..., validation=True)`: the training pool's material,
never the benchmark sets) at the proxy's side, beside each build's CPU cost.

    python benchmarks/demo_proxy_shape.py proxy-d3 proxy-d6 --json benchmarks/results/demo_proxy_shape.json

Prints one row per build (depth, parameters, steps, CPU hours, kNN / text IoU / PCK and their mean).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from eupe.demo import bench
from eupe.demo.assets import make_splits
from eupe.demo.pipeline import benchmark_sets, evaluate, load_demo, set_threads
from eupe.demo.proxy_build import load_shipped
from eupe.demo.report import METRICS
from eupe.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="folders written by `eupe demo build-proxy`")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    s, _ = load_demo()
    set_threads(s.threads)
    sets = benchmark_sets(make_splits(s.seed), s, validation=True)
    rows = {}
    for folder in args.builds:
        build = load_shipped(folder)
        model = create_model(str(folder))
        scores = evaluate(bench.encoder_featurizer(model, s.proxy_resolution), sets, s)
        rows[folder] = {
            "depth": build["student"]["depth"],
            "params": build["params"],
            "steps": build["steps"],
            "cpu_hours": round(build["cpu_seconds"] / 3600, 2),
            "validation": {m: scores[m] for m in METRICS},
            "validation_mean": float(np.mean([scores[m] for m in METRICS])),
        }
    print("| build | depth | params | steps | CPU h | val kNN | val text IoU | val PCK | mean |")
    print("|---|---|---|---|---|---|---|---|---|")
    for folder, r in rows.items():
        v = " | ".join(f"{r['validation'][m]:.3f}" for m in METRICS)
        print(
            f"| {Path(folder).name} | {r['depth']} | {r['params'] / 1e6:.1f}M | {r['steps']} | "
            f"{r['cpu_hours']} | {v} | {r['validation_mean']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
