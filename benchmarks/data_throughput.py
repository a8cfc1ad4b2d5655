"""Views per second of the data pipeline (decode + augment) on this machine; writes JSON.

Sources: generated JPEG files in a temporary folder (500x375, like a typical web photo) and the
in-memory synthetic source. For each, `num_workers` 0 and 2 at view 224 (the paper's 256 costs
about the same per pixel). Each run skips one warm-up batch.

    .venv/bin/python benchmarks/data_throughput.py [--out FILE] [--batches 6] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image

from eupe.data import DataConfig, SourceSpec, build_loader, synthetic_image


def _jpeg_folder(root: Path, n: int) -> None:
    for i in range(n):
        Image.fromarray(synthetic_image(0, i, 500)).resize((500, 375)).save(root / f"{i:05d}.jpg", quality=90)


def _measure(cfg: DataConfig, batches: int, batch: int, view: int) -> float:
    loader = build_loader(cfg, batch, view, seed=0)
    next(loader)  # warm-up: worker start, first decode
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/data_throughput.json")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--view", type=int, default=224)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        _jpeg_folder(Path(tmp), 256)
        sources = {
            "jpeg_folder_500x375": SourceSpec(name="jpg", type="folder", path=tmp),
            "synthetic_256": SourceSpec(name="syn", type="synthetic", size=1024, image_size=256),
        }
        for name, source in sources.items():
            for workers in (0, 2):
                cfg = DataConfig(sources=[source], num_workers=workers)
                rate = _measure(cfg, args.batches, args.batch, args.view)
                results.append({"source": name, "num_workers": workers, "views_per_s": round(rate, 1)})
                print(f"{name:22s} workers={workers}  {rate:7.1f} views/s  ({1000 / rate:.1f} ms/view)")
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "view": args.view,
        "batch": args.batch,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
