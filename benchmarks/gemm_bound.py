"""The fastest any fp32 runtime can run a ViT's matrix products on this CPU (one thread).

Times the GEMMs of one forward pass (qkv, proj, MLP, QK^T, AV at the model's token count) with
torch's oneDNN/MKL kernels and prints their sum: a lower bound for fp32 latency. The deploy
benchmark's eager / bound ratio is the largest fp32 speed-up an exporter could give.

    .venv/bin/python benchmarks/gemm_bound.py --dim 384 --heads 6 --depth 12 --size 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def cpu_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.thread_time()
        fn()
        times.append((time.thread_time() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--prefix", type=int, default=5, help="cls + register tokens")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, d, h = (args.size // 16) ** 2 + args.prefix, args.dim, args.heads
    total_ms, flops = 0.0, 0
    for k, m in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)):
        a, b = torch.randn(n, k), torch.randn(k, m)
        ms = cpu_ms(lambda a=a, b=b: a @ b)
        total_ms += ms * args.depth
        flops += 2 * n * k * m * args.depth
        print(f"[{n}x{k}] @ [{k}x{m}]: {2 * n * k * m / ms / 1e6:.1f} GFLOP/s")
    q, kt, p, v = (
        torch.randn(h, n, d // h),
        torch.randn(h, d // h, n),
        torch.randn(h, n, n),
        torch.randn(h, n, d // h),
    )
    total_ms += (cpu_ms(lambda: q @ kt) + cpu_ms(lambda: p @ v)) * args.depth
    flops += 2 * 2 * h * n * n * (d // h) * args.depth
    print(
        f"GEMMs of one forward: {flops / 1e9:.2f} GFLOPs in {total_ms:.1f} ms CPU ({flops / total_ms / 1e6:.1f} GFLOP/s)"
    )


if __name__ == "__main__":
    main()
