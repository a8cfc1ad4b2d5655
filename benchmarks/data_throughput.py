"""Loader views/s per CPU core, the loader before issue 14 vs now, and cores per GPU for Stage 2.

One process with one thread (= one core), 256 px views, the paper configs' augmentations, on two
sets of JPEGs: the photos bundled with the demo (56 files, 0.03-0.9 MP) and large photos made from
them (2.5-3.8 MP, quality 90; upscaled photos are smoother than camera photos, so they decode a
little faster than real ones of that size). Every path cuts the same views (same items, same
recorded parameters):

- before: what the loader did until issue 14, rebuilt from the same primitives: full-size decode,
  the whole image to float32, float crop + resize, per-view jitter/blur/solarize on the CPU.
- now, worker finish (`data.device_augment=false`, the CPU default): reduced JPEG decode
  (`decode_min_side: auto`), crop + resize + flip in uint8, the photometric half per view.
- now, device finish (`data.device_augment=true`, the CUDA default): the worker's share only
  (reduced decode, uint8 crop + resize + flip); the photometric half runs batched on the GPU. Its
  cost on this CPU (batched) is printed for reference; on a GPU it is a few elementwise kernels.

Cores per GPU = `eupe plan` images/s per GPU for the paper's Stage 2 / (views/s per core, device
finish), for the large and the bundled photos.

    .venv/bin/python benchmarks/data_throughput.py [--out FILE] [--views 96] [--view 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from eupe.data import DataConfig, SourceSpec, build_loader, finish_views, sample_params
from eupe.data.config import AugmentConfig

PHOTOS = Path(__file__).resolve().parents[1] / "src/eupe/demo/data/photos"
LARGE_SIDES = [(1920, 1280), (2048, 1536), (2400, 1600)]  # 2.5, 3.1, 3.8 MP
STAGE2 = ["configs/paper/stage2_vitb16.yaml", "configs/paper/stage2_vitt16.yaml"]


def _large_folder(root: Path, n: int) -> None:
    photos = sorted(PHOTOS.glob("*.jpg"))
    for i in range(n):
        w, h = LARGE_SIDES[i % len(LARGE_SIDES)]
        with Image.open(photos[i % len(photos)]) as img:
            img.convert("RGB").resize((w, h), Image.BICUBIC).save(root / f"{i:03d}.jpg", quality=90)


def _before(loader, entry: tuple[int, int, int, int], aug: AugmentConfig, size: int) -> torch.Tensor:
    """The pre-issue-14 view of one plan entry (same parameters as the loader's view)."""
    sid, position, src, idx = entry
    image = loader.sources[src].load(idx, 0)  # full-size decode
    params = sample_params(
        np.random.default_rng([loader.seed, sid, position, 0xA6]), aug, image.width, image.height
    )
    whole = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255.0)  # whole image in float32
    view = TF.resized_crop(whole, *params["crop"], [size, size], InterpolationMode.BILINEAR, antialias=True)
    view = view.clamp_(0.0, 1.0)
    if params["flip"]:
        view = view.flip(-1)
    return finish_views(view[None], [params])[0]  # per view, float32, on the CPU


def _rate(fn, entries: list) -> float:
    fn(entries[0])  # warm-up
    start = time.perf_counter()
    for e in entries:
        fn(e)
    return len(entries) / (time.perf_counter() - start)


def measure(folder: str, views: int, size: int) -> dict[str, float]:
    src = SourceSpec(name="photos", type="folder", path=folder)
    on = build_loader(DataConfig(sources=[src], device_augment=True), 16, size, seed=0)
    off = build_loader(DataConfig(sources=[src], device_augment=False), 16, size, seed=0)
    plan = on.plan.clone()
    entries = [e for _ in range(views // 16) for e in plan.next()[2]]
    aug = on.cfg.augment
    rates = {
        "before": _rate(lambda e: _before(on, e, aug, size), entries),
        "now_worker_finish": _rate(lambda e: off.dataset[e], entries),
        "now_device_finish": _rate(lambda e: on.dataset[e], entries),
    }
    crops = [on.dataset[e] for e in entries[:64]]
    batch, params = torch.stack([c[0] for c in crops]), [c[1] for c in crops]
    finish_views(batch, params)
    start = time.perf_counter()
    finish_views(batch, params)
    rates["photometric_batched_on_cpu"] = len(crops) / (time.perf_counter() - start)
    return rates


def stage2_rates() -> dict[str, float]:
    """Images/s per GPU that `eupe plan` expects for the paper's Stage 2 (8 H100, MFU 0.4)."""
    from eupe.distill.plan import load_plan_spec, plan

    out = {}
    for config in STAGE2:
        p = plan(load_plan_spec(config, []), gpus=8)
        out[Path(config).stem] = p["images"]["seen"] / p["time"]["seconds"] / 8
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/data_throughput.json")
    ap.add_argument("--views", type=int, default=96, help="views per path and set (a multiple of 16)")
    ap.add_argument("--view", type=int, default=256)
    ap.add_argument("--large", type=int, default=24, help="large photos to generate")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        _large_folder(Path(tmp), args.large)
        for name, folder in (("bundled", str(PHOTOS)), ("large_2.5-3.8MP", tmp)):
            results[name] = measure(folder, args.views, args.view)
    gpu = stage2_rates()
    print(f"views/s per core, {args.view} px views (one process, one thread)")
    print(f"{'set':18s} {'before':>8s} {'now, worker finish':>19s} {'now, device finish':>19s}  ratios")
    for name, r in results.items():
        a, b, c = r["before"], r["now_worker_finish"], r["now_device_finish"]
        print(f"{name:18s} {a:8.1f} {b:19.1f} {c:19.1f}  {b / a:.1f}x, {c / a:.1f}x")
        r["ratio_worker_finish"], r["ratio_device_finish"] = b / a, c / a
    print(
        "photometric half batched on this CPU (a GPU's job with device_augment): "
        + ", ".join(f"{n} {r['photometric_batched_on_cpu']:.0f} views/s" for n, r in results.items())
    )
    cores = {}
    for config, rate in gpu.items():
        cores[config] = {n: rate / r["now_device_finish"] for n, r in results.items()}
        print(
            f"{config}: plan {rate:.0f} images/s per H100 -> cores per GPU: "
            + ", ".join(f"{n} {v:.1f}" for n, v in cores[config].items())
        )
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "view": args.view,
        "views_per_path": args.views,
        "views_per_s_per_core": results,
        "plan_images_per_s_per_gpu": gpu,
        "cores_per_gpu": cores,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
