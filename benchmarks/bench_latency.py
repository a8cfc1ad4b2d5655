"""Batch-1 CPU latency of the EUPE students in eager PyTorch, torch.compile, onnxruntime and
ExecuTorch/XNNPACK, all with one thread count, with ratios against eager.

Every exported artifact is verified against eager fp32 (max abs diff <= 1e-4) before it is timed.
Cells for one model and size run back to back, so a change in machine load between models does not
bias the ratios. Results are appended to the JSON file after every model/size (a killed run keeps
what it measured).

    .venv/bin/python benchmarks/bench_latency.py --threads 2 --runs 10 --json benchmarks/results/latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from eupe.deploy.cost import machine, make_runner, measure
from eupe.models import create_model

MODELS = ("eupe_vitt16", "eupe_vits16", "eupe_vitb16", "eupe_convnext_tiny")
RUNTIMES = ("eager", "compile", "onnx", "executorch")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    result = {
        "machine": machine(),
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "batch": 1,
        "dtype": "float32",
        "cells": [],
    }
    with tempfile.TemporaryDirectory(prefix="eupe_bench_") as tmp:
        for name in args.models:
            for size in args.sizes:
                torch.manual_seed(0)
                model = create_model(name).eval()  # random init: latency does not depend on weights
                images = torch.randn(1, 3, size, size)
                for runtime in args.runtimes:
                    start = time.time()
                    cell = {"model": name, "size": size, "runtime": runtime, "load_before": load_average()}
                    try:
                        runner = make_runner(runtime, model, size, Path(tmp), args.threads)
                        cell["prepare_s"] = round(time.time() - start, 1)
                        timing = measure(runner, images, args.runs, args.warmup)
                        cell["ms"], cell["cpu_ms"] = timing["wall_ms"], timing["cpu_ms"]
                        cell["cosine_to_fp32"] = getattr(runner, "cosine_to_fp32", None)
                    except Exception as e:  # one failing runtime must not lose the others
                        cell["error"] = (
                            f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                        )
                    cell["load_after"] = load_average()
                    result["cells"].append(cell)
                    print(json.dumps(cell), flush=True)
                    if args.json:
                        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(result: dict, key: str = "ms") -> str:
    """Markdown: `key` (wall "ms" or "cpu_ms") per runtime and the speed-up over eager."""
    runtimes = list(dict.fromkeys(c["runtime"] for c in result["cells"]))
    keys = list(dict.fromkeys((c["model"], c["size"]) for c in result["cells"]))
    ms = {(c["model"], c["size"], c["runtime"]): c.get(key) for c in result["cells"]}
    head = ["Model", "Size"] + [f"{r} ms" for r in runtimes] + [f"{r} x" for r in runtimes if r != "eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, size in keys:
        eager = ms.get((model, size, "eager"))
        cells = [model, str(size)]
        cells += [
            "—" if ms.get((model, size, r)) is None else f"{ms[(model, size, r)]:.1f}" for r in runtimes
        ]
        for r in runtimes:
            if r != "eager":
                value = ms.get((model, size, r))
                cells.append("—" if value is None or eager is None else f"{eager / value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    m = result["machine"]
    return "\n".join(
        [
            f"{'wall time' if key == 'ms' else 'CPU time of the calling thread'} (ms): "
            f"{m['cpu']}, {m['cpu_count']} cores, {result['threads']} threads, batch 1, fp32, "
            f"median of {result['runs']} runs after {result['warmup']} warm-up; torch {m['torch']}, "
            f"onnxruntime {m['onnxruntime']}, executorch {m['executorch']}",
            "",
            *lines,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument(
        "--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES) + ["pt2", "executorch_int8"]
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/latency.json")
    parser.add_argument(
        "--tables", nargs="+", metavar="JSON", help="only print the tables of these result files"
    )
    args = parser.parse_args()
    if args.tables:
        results = [json.loads(Path(p).read_text()) for p in args.tables]
        result = {**results[0], "cells": [c for r in results for c in r["cells"]]}
    else:
        result = run(args)
    print(table(result, "ms"))
    if any("cpu_ms" in c for c in result["cells"]):
        print()
        print(table(result, "cpu_ms"))


if __name__ == "__main__":
    main()
