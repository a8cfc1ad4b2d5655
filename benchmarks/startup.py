"""How long the front door takes: `eupe --help`, `import eupe`, and what a real command then imports.

Each line is a fresh Python process (the OS file cache warm from earlier runs); the best of --runs
is reported, so a busy machine adds noise but not bias. The goals (issue 28) are `eupe --help` and
`import eupe` within 0.5 s; a command that does work still imports torch and timm when it starts,
and the last rows show what that costs, so it is measured, not hidden.

    .venv/bin/python benchmarks/startup.py --runs 5 --json benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

EUPE = [sys.executable, "-m", "eupe"]
CASES = {  # name -> (argv, goal in seconds or None)
    "python (empty)": ([sys.executable, "-c", "pass"], None),
    "eupe --help": ([*EUPE, "--help"], 0.5),
    "eupe eval knn --help": ([*EUPE, "eval", "knn", "--help"], 0.5),
    "import eupe": ([sys.executable, "-c", "import eupe"], 0.5),
    "import torch": ([sys.executable, "-c", "import torch"], None),
    "import timm": ([sys.executable, "-c", "import timm"], None),
    "first command's imports (eupe.models)": ([sys.executable, "-c", "import eupe.models"], None),
    "eupe models (a whole command)": ([*EUPE, "models"], None),
}


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def best_of(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="processes per case; the fastest counts")
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    args = parser.parse_args()
    best_of(CASES["import timm"][0], 1)  # warm the file cache once
    rows = []
    for name, (argv, goal) in CASES.items():
        seconds = best_of(argv, args.runs)
        rows.append({"case": name, "seconds": round(seconds, 3), "goal_s": goal})
    torch_s = next(r["seconds"] for r in rows if r["case"] == "first command's imports (eupe.models)")
    print(f"{'case':<40}{'best s':>8}{'goal':>7}  vs the first command's imports")
    for r in rows:
        goal = "" if r["goal_s"] is None else ("ok" if r["seconds"] <= r["goal_s"] else "MISSED")
        print(f"{r['case']:<40}{r['seconds']:>8.3f}{goal:>7}  {r['seconds'] / torch_s:>6.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {"machine": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
        args.json.write_text(json.dumps({"runs": args.runs, **info, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
