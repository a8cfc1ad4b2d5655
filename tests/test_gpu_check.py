"""benchmarks/gpu_check.py --tiny: the GPU check's code path runs on CPU, so it cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_runs_and_reports(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--tiny", "--procs", "2"]
    cmd += ["--parallel", "fsdp", "--parallel-steps", "2", "--json", str(out)]  # DDP: test_distill_scale
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["compiled"] for r in report["single"]] == [False, True]
    for r in report["single"]:
        assert r["images_per_s"] > 0 and r["tflop_per_step"] > 0 and r["mfu"] is None  # no GPU peak on CPU
    assert [(r["mode"], r["world"], r["sharded"], r["final"]) for r in report["parallel"]] == [
        ("fsdp", 2, True, True)
    ]
    assert "eager" in proc.stdout and "fsdp x2" in proc.stdout
    aug = report["device_augment"]
    assert aug["views_per_s"] > 0 and aug["max_abs_diff_vs_cpu"] == 0.0  # the device is the CPU here
