"""Issue 12's proof on a GPU: is the trainer correct and fast on the hardware it is written for?

    python benchmarks/gpu_check.py [--json OUT]          # on a GPU machine
    python benchmarks/gpu_check.py --tiny [--json OUT]   # CPU, tiny models (a test runs this)

On a GPU it runs Stage 2 as the paper does (a ViT-B/16 student at 256 px, bf16 autocast) against a
randomly initialised teacher of the proxy's width (`eupe_proxy_g16`, `--teacher-depth` blocks; all
50 by default), eager and with `train.compile=true`, and prints for each:

- images/s over `--steps` timed optimizer steps (after warm-up; compile happens in warm-up);
- MFU: FLOPs of one step (`torch.utils.flop_counter.FlopCounterMode`: teacher forward + student
  forward and backward) x steps/s, over the dense bf16 peak of the GPU it found;
- peak GPU memory;
- whether a step (a logging one and a quiet one) ran under `torch.cuda.set_sync_debug_mode("error")`
  with no synchronization besides the one the trainer marks as allowed (`runtime.allowed_sync`).

The views are made once on the device, so data loading is not in these numbers (the data path is
measured by benchmarks/data_throughput.py); the photometric half the GPU takes over from the data
workers (`data.device_augment`) is checked separately: views/s of `finish_views` on the device for
a batch of 256 px uint8 crops, and its largest difference from the same views finished on the CPU. With 2+ GPUs (or `--procs N`) it then runs 20 DDP and
20 FSDP2 steps under torchrun (NCCL on GPUs, gloo on the CPU), checkpoint and final save included.
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

import torch
from torch.utils.flop_counter import FlopCounterMode

from eupe.distill.config import load_config
from eupe.distill.targets import ViewBatch
from eupe.distill.trainer import Distiller
from eupe.models.zoo import ZOO

# Dense bf16 tensor-core peaks (FLOP/s) by device name; MFU is left out for GPUs not listed here.
PEAK_BF16 = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():  # "H100 PCIe" before "H100"
        if key in name:
            return peak
    return None


def overrides(args: argparse.Namespace, out: Path, compiled: bool, steps: int) -> list[str]:
    """The run: Stage 2, one teacher, synthetic data (the views are replaced by fixed device ones)."""
    if args.tiny:
        teacher = "{backend: eupe, model: eupe_vitt16, resolution: 64, kwargs: {depth: 2}}"
        student = ["student.name=eupe_vitt16", "student.resolution=64", "student.overrides={depth: 1}"]
        batch, hidden, device, bf16 = 4, 64, "cpu", "false"
    else:
        depth = f", kwargs: {{depth: {args.teacher_depth}}}" if args.teacher_depth else ""
        teacher = f"{{backend: eupe, model: eupe_proxy_g16, resolution: 256{depth}}}"
        student = ["student.name=eupe_vitb16", "student.resolution=256"]
        batch, hidden, device, bf16 = args.batch, 3072, "auto", "true"
    return [
        f"output_dir={out}",
        f"teachers={{proxy: {teacher}}}",
        *student,
        f"heads.hidden_dim={hidden}",
        "norm.batches=1",
        f"train.global_batch={batch * int(os.environ.get('WORLD_SIZE', '1'))}",
        "train.accum_steps=1",
        f"train.max_steps={steps}",
        "train.warmup_steps=0",
        "train.log_every=2",
        f"train.checkpoint_every={steps}",
        "train.progress=false",
        f"train.device={device}",
        f"train.bf16={bf16}",
        f"train.compile={str(compiled).lower()}",
        "data.sources=[{name: synthetic, type: synthetic, size: 64, image_size: 64}]",
    ]


def fixed_views(d: Distiller) -> None:
    """Serve one batch of views made on the device, so only the training step is measured."""
    g = torch.Generator().manual_seed(d.rank)
    views = torch.rand(d.micro, 3, d.view_size(), d.view_size(), generator=g).to(d.device)
    d._next_batch = lambda: ViewBatch(views)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_check(d: Distiller) -> str:
    """'ok' if a quiet step and a logging step synchronize only where the trainer allows it."""
    if d.device.type != "cuda":
        return "not checked (CPU: there is no device to wait for)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # log_every=2: one quiet step and one logging step
            d.train_step()
    except RuntimeError as e:
        return f"FAILED: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return "ok"


def measure(args: argparse.Namespace, compiled: bool) -> dict:
    """One configuration on one process: throughput, FLOPs, MFU, memory, host syncs."""
    steps = args.warmup + args.steps + 4
    with tempfile.TemporaryDirectory() as tmp:
        d = Distiller(load_config(None, overrides(args, Path(tmp) / "run", compiled, steps)))
        fixed_views(d)
        d.prepare()
        d._window = (0, time.perf_counter())
        for _ in range(args.warmup):  # includes compilation
            d.train_step()
        sync(d.device)
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        start = time.perf_counter()
        for _ in range(args.steps):
            d.train_step()
        sync(d.device)
        seconds = (time.perf_counter() - start) / args.steps
        with FlopCounterMode(display=False) as counter:
            d.train_step()
        flops = counter.get_total_flops()
        checked = sync_check(d)
        peak = peak_flops(d.device)
        return {
            "compiled": compiled,
            "images_per_s": d.micro / seconds,
            "step_s": seconds,
            "tflop_per_step": flops / 1e12,
            "achieved_tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated(d.device) / 2**30
            if d.device.type == "cuda"
            else None,
            "host_syncs": checked,
        }


def device_augment(args: argparse.Namespace) -> dict:
    """`finish_views` on the training device vs the CPU (the data workers' path) for one batch."""
    import numpy as np

    from eupe.data import finish_views, sample_params
    from eupe.data.config import AugmentConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    side, n = (32, 8) if args.tiny else (256, args.batch)
    rng = np.random.default_rng(0)
    params = [sample_params(rng, AugmentConfig(), side, side) for _ in range(n)]
    crops = torch.randint(
        0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    on_cpu = finish_views(crops, params)
    crops = crops.to(device)
    finish_views(crops, params)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        out = finish_views(crops, params)
    sync(device)
    rate = n * args.steps / (time.perf_counter() - start)
    return {"views_per_s": rate, "max_abs_diff_vs_cpu": float((out.cpu() - on_cpu).abs().max())}


def worker(args: argparse.Namespace) -> None:
    """One rank of the DDP/FSDP2 check (started by torchrun from `parallel`)."""
    steps = args.steps
    cfg = load_config(
        None, [*overrides(args, Path(args.out), False, steps), f"train.fsdp={args.worker == 'fsdp'}"]
    )
    d = Distiller(cfg)
    fixed_views(d)
    start = time.perf_counter()
    d.train()
    seconds = time.perf_counter() - start
    if d.rank == 0:
        sharded = any(s.sharded for s in d.students.values())
        result = {"mode": args.worker, "world": d.world, "steps": steps, "sharded": sharded}
        result["images_per_s"] = d.micro * d.world * steps / seconds
        result["final"] = (Path(args.out) / "final" / "model.safetensors").is_file()
        Path(args.out, "gpu_check.json").write_text(json.dumps(result))


def parallel(args: argparse.Namespace, procs: int) -> list[dict]:
    """20 DDP and 20 FSDP2 steps (checkpoint and final included) on `procs` processes."""
    results = []
    for mode in args.parallel:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / mode
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
            cmd += [__file__, "--worker", mode, "--out", str(out), "--steps", str(args.parallel_steps)]
            cmd += ["--tiny"] if args.tiny else ["--batch", str(args.batch)]
            if args.teacher_depth:
                cmd += ["--teacher-depth", str(args.teacher_depth)]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            if proc.returncode:
                results.append({"mode": mode, "world": procs, "error": proc.stderr.strip()[-2000:]})
            else:
                results.append(json.loads((out / "gpu_check.json").read_text()))
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models: checks that the script runs")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--batch", type=int, default=128, help="images per GPU per step (default 128)")
    proxy_depth = ZOO["eupe_proxy_g16"].timm_kwargs["depth"]
    p.add_argument(
        "--teacher-depth", type=int, default=0, help=f"teacher blocks (default: the proxy's {proxy_depth})"
    )
    p.add_argument("--steps", type=int, default=0, help="timed steps (default 20; tiny 2)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 5; tiny 1)")
    p.add_argument("--procs", type=int, default=-1, help="processes for DDP/FSDP2 (default: #GPUs if >= 2)")
    p.add_argument("--parallel-steps", type=int, default=0, help="DDP/FSDP2 steps (default 20; tiny 4)")
    p.add_argument(
        "--parallel",
        default="ddp,fsdp",
        type=lambda v: v.split(","),
        help="multi-process modes (default ddp,fsdp)",
    )
    p.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.steps = args.steps or (2 if args.tiny else 20)
    args.warmup = args.warmup or (1 if args.tiny else 5)
    args.parallel_steps = args.parallel_steps or (4 if args.tiny else 20)
    if args.worker:
        worker(args)
        return 0
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --tiny for the CPU check", file=sys.stderr)
        return 2
    if args.tiny:
        torch.set_num_threads(1)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    procs = args.procs if args.procs >= 0 else (gpus if gpus >= 2 else 0)
    report = {
        "machine": {
            "device": torch.cuda.get_device_name(0) if gpus else platform.processor() or platform.machine(),
            "gpus": gpus,
            "torch": torch.__version__,
            "tiny": args.tiny,
        },
        "single": [measure(args, compiled) for compiled in (False, True)],
        "device_augment": device_augment(args),
        "parallel": parallel(args, procs) if procs >= 2 else [],
    }
    print(f"gpu_check on {report['machine']['device']} (torch {torch.__version__})")
    print(
        f"{'mode':<10}{'images/s':>10}{'TFLOP/step':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}  host syncs"
    )
    for r in report["single"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(
            f"{'compiled' if r['compiled'] else 'eager':<10}{r['images_per_s']:>10.1f}{r['tflop_per_step']:>12.3g}"
            f"{r['achieved_tflops']:>10.3g}{mfu:>8}{mem:>10}  {r['host_syncs']}"
        )
    aug = report["device_augment"]
    print(
        f"device_augment: {aug['views_per_s']:.0f} views/s finished on the device, "
        f"max |device - cpu| {aug['max_abs_diff_vs_cpu']:.2e}"
    )
    for r in report["parallel"]:
        if "error" in r:
            print(f"{r['mode']} x{r['world']}: FAILED\n{r['error']}")
        else:
            print(f"{r['mode']} x{r['world']}: {r['images_per_s']:.1f} images/s, final written: {r['final']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    failed = (
        any("error" in r for r in report["parallel"])
        or any(r["host_syncs"].startswith("FAILED") for r in report["single"])
        or aug["max_abs_diff_vs_cpu"] > 1e-4
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
