"""How much the frozen-feature cache saves a linear probe (eupe.eval.features, `cache_views`).

Runs the ADE20k linear-segmentation probe twice on a generated ADE20k-layout set, once computing
the backbone every step (`cache_views=0`, the paper's protocol) and once from cached features of one
fixed view per image (`cache_views=1`), and reports wall time per iteration, the cache build time,
and the projected cost of the paper's 40k-iteration, 20,210-image run.

    .venv/bin/python benchmarks/eval_probe_cache.py --model eupe_vitt16 --resolution 224 --iters 30
Writes a JSON line to stdout (and to --output if given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_eval_data import make_ade20k  # noqa: E402

import eupe.eval as ev  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="eupe_vitt16")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--images", type=int, default=32, help="training images generated")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--output")
    a = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        make_ade20k(Path(tmp), n_train=a.images, n_val=1, size=a.resolution)
        common = dict(
            resolution=a.resolution,
            iterations=a.iters,
            batch_size=a.batch_size,
            num_workers=a.num_workers,
            max_val_images=1,
            device="auto",
        )
        runs = {}
        for views in (0, 1):
            start = time.perf_counter()
            r = ev.seg(a.model, tmp, cache_views=views, **common)
            runs[views] = {**{k: r.extra[k] for k in ("seconds_per_iteration", "cache_seconds")}}
            runs[views]["wall_seconds"] = time.perf_counter() - start
    per_image_fwd = runs[1]["cache_seconds"] / a.images
    paper_iters, paper_images = 40_000, 20_210
    no_cache = paper_iters * runs[0]["seconds_per_iteration"]
    cached = paper_images * per_image_fwd + paper_iters * runs[1]["seconds_per_iteration"]
    out = {
        "model": a.model,
        "resolution": a.resolution,
        "batch_size": a.batch_size,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "no_cache_s_per_iter": runs[0]["seconds_per_iteration"],
        "cached_s_per_iter": runs[1]["seconds_per_iteration"],
        "cache_build_s_per_image": per_image_fwd,
        "measured_speedup_per_iter": runs[0]["seconds_per_iteration"] / runs[1]["seconds_per_iteration"],
        "projected_40k_iters_no_cache_h": no_cache / 3600,
        "projected_40k_iters_cache_1_view_h": cached / 3600,
        "projected_speedup": no_cache / cached,
    }
    line = json.dumps(out)
    print(line)
    if a.output:
        Path(a.output).write_text(line + "\n")


if __name__ == "__main__":
    main()
