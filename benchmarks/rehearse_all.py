"""Rehearse every paper config at 8 and 64 ranks and write the table of docs/scale.md.

    python benchmarks/rehearse_all.py                 # all configs/paper/*.yaml at 8 and 64 ranks
    python benchmarks/rehearse_all.py --worlds 64 --configs stage2_vitb16 stage1_proxy
    python benchmarks/rehearse_all.py --update-docs   # also rewrite the table in docs/scale.md

Each rehearsal (`eupe distill CONFIG --rehearse WORLD --json ...`) runs in its own process, one
after another on one core (2 s to 2 min each). The figures go to
benchmarks/results/rehearse_all.json; the markdown table is printed, and with --update-docs it
replaces the text between the REHEARSAL-TABLE markers in docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "rehearse_all.json"
DOC = REPO / "docs" / "scale.md"
BEGIN, END = "<!-- REHEARSAL-TABLE BEGIN -->", "<!-- REHEARSAL-TABLE END -->"
SHORT = {
    "params": "params",
    "grads": "grads",
    "optimizer": "opt",
    "activations": "act",
    "teacher_weights": "T wts",
    "teacher_forward": "T fwd",
    "comm_buffers": "comm",
    "other": "other",
}


def paper_configs() -> list[Path]:
    """configs/paper/*.yaml except the `_*.yaml` bases (the family config included)."""
    return sorted(p for p in (REPO / "configs" / "paper").glob("*.yaml") if not p.name.startswith("_"))


def rehearse(config: Path, world: int, gpu: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [
            sys.executable,
            "-m",
            "eupe",
            "distill",
            str(config.relative_to(REPO)),
            "--rehearse",
            str(world),
        ]
        cmd += ["--gpu", gpu, "--json", str(out)]
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        if proc.returncode not in (0, 4) or not out.is_file():
            return {
                "config": str(config.relative_to(REPO)),
                "world": world,
                "error": proc.stderr.strip()[-1500:],
            }
        return json.loads(out.read_text())


def table(results: list[dict]) -> str:
    head = [
        "config",
        "ranks",
        "micro x accum",
        "par.",
        *SHORT.values(),
        "peak",
        "fits 80 GB",
        "plan",
        "plan diff",
        "TFLOP/img",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        name = Path(r["config"]).stem
        if "error" in r:
            rows.append(f"| {name} | {r['world']} | error: {r['error'].splitlines()[-1][:80]} |")
            continue
        par = "/".join(sorted(set(r["parallelism"].values())))
        cells = [
            name,
            str(r["world"]),
            f"{r['micro_batch']} x {r['accum_steps']}" + (" +ckpt" if r["activation_checkpointing"] else ""),
            par,
            *(f"{r['by_category_gib'][k]:.1f}" for k in SHORT),
            f"**{r['peak_gib']:.1f}**",
            "yes" if r["fits"] else "**NO**",
            f"{r['plan_peak_gib']:.1f}" if r["plan_peak_gib"] is not None else "-",
            f"{r['plan_diff']:.0%}" if r["plan_diff"] is not None else "-",
            f"{r['flops_per_image'] / 1e12:.2f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[8, 64])
    p.add_argument("--configs", nargs="+", help="config stems (default: every configs/paper/*.yaml)")
    p.add_argument("--gpu", default="h100-80gb")
    p.add_argument("--update-docs", action="store_true", help="rewrite the table in docs/scale.md")
    args = p.parse_args()
    configs = paper_configs()
    if args.configs:
        configs = [c for c in configs if c.stem in args.configs]
    results = []
    for config in configs:
        for world in args.worlds:
            start = time.perf_counter()
            r = rehearse(config, world, args.gpu)
            results.append(r)
            status = "error" if "error" in r else f"{r['peak_gib']:.1f} GiB, fits {r['fits']}"
            print(
                f"{config.stem} x{world}: {status} ({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"machine": platform.processor() or platform.machine(), "gpu": args.gpu, "results": results},
            indent=1,
        )
    )
    text = table(results)
    print(text)
    if args.update_docs:
        doc = DOC.read_text()
        if BEGIN not in doc or END not in doc:
            print(f"{DOC}: no {BEGIN} ... {END} markers; table not written", file=sys.stderr)
            return 1
        head, rest = doc.split(BEGIN, 1)
        DOC.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
