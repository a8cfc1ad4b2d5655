"""Inference cost, paper Table 11 style: parameters, FLOPs per image, measured CPU latency.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` on meta tensors (no memory, so the
1.9B proxy and timm's giant teachers cost nothing to count); it counts a multiply-add as 2 FLOPs
and only matmul/conv/attention ops (norms, activations and softmax are not counted). Latency is
the median wall time of batch-1 runs after warm-up, with a stated thread count, for eager PyTorch
and each requested runtime (every exported artifact is verified first, see `export.py`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ..errors import EupeError
from ..models import STUDENTS, ZOO, count_params, create_model
from . import runtimes as rt
from .export import FORMATS, export_model

FLOP_CONVENTION = (
    "GFLOPs per image from torch.utils.flop_counter.FlopCounterMode: a multiply-add counts as "
    "2 FLOPs; matmul, convolution and attention only (norms, activations, softmax not counted)"
)
LATENCY_RUNTIMES = ("eager", "compile", "onnx", "executorch")
MAX_LATENCY_PARAMS = 500_000_000  # larger models: FLOPs only (the paper's "not for edge" rows)
FLOPS_ONLY = {"eupe_proxy_g16"}


@dataclass
class CostRow:
    """One model's row: params, GFLOPs and latency (ms) per input size."""

    model: str
    kind: str  # "zoo" or "timm"
    params: int
    gflops: dict[int, float] = field(default_factory=dict)
    grid: dict[int, list[int]] = field(default_factory=dict)
    latency_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    cpu_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # calling thread, see `measure`
    notes: list[str] = field(default_factory=list)


def machine() -> dict[str, Any]:
    """The CPU the latency was measured on (`lscpu`'s model name) and the software versions."""
    name = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": name,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "onnxruntime": rt.version("onnxruntime"),
        "executorch": rt.version("executorch"),
    }


def _build(name: str, size: int | None, device: str, weights: str | None = None) -> tuple[nn.Module, str]:
    """A zoo model, a `save_pretrained` folder, or any timm architecture (random init)."""
    if name in ZOO or os.path.isdir(name):
        if device == "meta" and name not in ZOO:
            return create_model(name).to("meta"), "zoo"
        return create_model(name, weights=weights, device=device if name in ZOO else None), "zoo"
    import timm

    if not timm.is_model(name):
        raise EupeError(f"unknown model '{name}': not a zoo name ({', '.join(ZOO)}), folder or timm model")
    with torch.device(device):
        try:  # ViTs: build at this size so the position embedding and grid match it
            if size is None:
                raise TypeError
            model = timm.create_model(name, pretrained=False, num_classes=0, img_size=size)
        except TypeError:  # native size (the parameter count), or a model without img_size
            model = timm.create_model(name, pretrained=False, num_classes=0)
    return model.eval(), "timm"


def _forward(model: nn.Module, images: torch.Tensor) -> Any:
    return model(images) if hasattr(model, "family") else model.forward_features(images)


def count_flops(model: nn.Module, size: int) -> tuple[float, list[int]]:
    """GFLOPs of one size x size image and the output grid, on whatever device `model` is on."""
    device = next(model.parameters()).device
    images = torch.zeros(1, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = _forward(model, images)
    grid = (
        list(out.grid) if hasattr(out, "grid") else list(out.shape[-2:] if out.dim() == 4 else out.shape[1:2])
    )
    return counter.get_total_flops() / 1e9, [int(g) for g in grid]


def measure_latency(runner: rt.Runner, images: torch.Tensor, runs: int, warmup: int) -> float:
    """Median wall time in ms of `runs` calls after `warmup` untimed ones."""
    return measure(runner, images, runs, warmup)["wall_ms"]


def measure(runner: rt.Runner, images: torch.Tensor, runs: int, warmup: int) -> dict[str, float]:
    """Median wall time and median CPU time of the calling thread, in ms.

    With one thread every runtime computes in the calling thread, so its CPU time is the compute
    time even when other processes compete for the cores (wall time then includes their share).
    """
    if runs < 1:
        raise EupeError(f"runs must be >= 1, got {runs}")
    for _ in range(warmup):
        runner(images)
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.thread_time()
        runner(images)
        cpu.append((time.thread_time() - start_cpu) * 1e3)
        wall.append((time.perf_counter() - start) * 1e3)
    return {"wall_ms": statistics.median(wall), "cpu_ms": statistics.median(cpu)}


def make_runner(runtime: str, model: nn.Module, size: int, workdir: Path, threads: int) -> rt.Runner:
    """A verified runner for `runtime` (exports go to `workdir`, checked against eager first)."""
    if runtime == "eager":
        return rt.eager_runner(model)
    if runtime == "compile":
        return rt.compile_runner(model)
    fmt, quantize = (runtime[:-5], "int8") if runtime.endswith("_int8") else (runtime, None)
    if fmt not in FORMATS:
        raise EupeError(f"unknown runtime {runtime!r}; choose from {', '.join(rt.RUNTIMES)}")
    out = workdir / f"{model.arch}_{size}_{runtime}{FORMATS[fmt]}"
    # Latency only: an int8 model's accuracy is reported by `eupe export --quantize int8`.
    result = export_model(
        model, fmt, size=size, output=out, threads=threads, quantize=quantize, min_cosine=-1.0
    )
    if fmt == "onnx":
        return rt.onnx_runner(result.artifact, threads)
    if fmt == "pt2":
        return rt.pt2_runner(result.artifact)
    runner = rt.executorch_runner(result.artifact, threads)
    if quantize:  # random-init weights: this cosine says little about a trained model
        runner.cosine_to_fp32 = result.info["quantization"]["cosine_to_fp32"]  # type: ignore[attr-defined]
    return runner


def cost_table(
    models: Sequence[str] = STUDENTS,
    *,
    sizes: Sequence[int] = (256, 512),
    runtimes: Sequence[str] = ("eager",),
    runs: int = 10,
    warmup: int = 3,
    threads: int | None = None,
    weights: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Rows for `models`; latency for each model small enough for a CPU (see MAX_LATENCY_PARAMS)."""
    bad = [r for r in runtimes if r not in rt.RUNTIMES]
    if bad:
        raise EupeError(f"unknown runtime(s) {bad}; choose from {', '.join(rt.RUNTIMES)}")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    jobs = tqdm(total=len(models) * len(sizes) * (1 + len(runtimes)), desc="cost", unit="job", leave=False)
    with tempfile.TemporaryDirectory(prefix="eupe_cost_") as tmp:
        for name in models:
            row = _flops_row(name, sizes)
            jobs.update(len(sizes))
            measurable = name not in FLOPS_ONLY and row.params <= MAX_LATENCY_PARAMS and bool(runtimes)
            if runtimes and not measurable:
                row.notes.append("latency not measured: FLOPs on the meta device only (too large for a CPU)")
            for size in sizes:
                if not measurable:
                    jobs.update(len(runtimes))
                    continue
                model, kind = _build(name, size, "cpu", (weights or {}).get(name))
                images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
                for runtime in runtimes:
                    jobs.set_postfix_str(f"{name} {size} {runtime}")
                    if kind == "timm" and runtime != "eager":
                        _note(row, f"{runtime}: exported runtimes are measured for eupe models only")
                    else:
                        runner = (
                            rt.features_runner(model)
                            if kind == "timm"
                            else make_runner(runtime, model, size, Path(tmp), threads)
                        )
                        timing = measure(runner, images, runs, warmup)
                        row.latency_ms.setdefault(runtime, {})[size] = timing["wall_ms"]
                        row.cpu_ms.setdefault(runtime, {})[size] = timing["cpu_ms"]
                    jobs.update(1)
            rows.append(row)
    jobs.close()
    return {
        "header": {
            "flops": FLOP_CONVENTION,
            "params": "zoo models: entries of the official state_dict (eupe.models.count_params "
            "'official'); timm models: module parameters",
            "latency": f"median of {runs} runs after {warmup} warm-up runs, batch 1, fp32, "
            f"{threads} thread(s), CPU",
            "cpu_ms": "median CPU time of the calling thread; with 1 thread, the compute time even "
            "when other processes share the cores (latency_ms is wall time)",
            "threads": threads,
            "runs": runs,
            "warmup": warmup,
            "sizes": list(sizes),
            "runtimes": list(runtimes),
            "machine": machine(),
        },
        "rows": [asdict(r) for r in rows],
    }


def _note(row: CostRow, text: str) -> None:
    if text not in row.notes:
        row.notes.append(text)


def _flops_row(name: str, sizes: Sequence[int]) -> CostRow:
    row: CostRow | None = None
    for size in sizes:
        model, kind = _build(name, size, "meta")
        if row is None:
            # timm ViTs resize their position embedding with img_size: count at the native size.
            params = (
                count_params(model, "official")
                if kind == "zoo"
                else sum(p.numel() for p in _build(name, None, "meta")[0].parameters())
            )
            row = CostRow(model=name, kind=kind, params=params)
        stride = getattr(model, "stride", None)
        if stride and size % stride:
            raise EupeError(f"{name}: size {size} is not a multiple of its stride {stride}")
        row.gflops[size], row.grid[size] = count_flops(model, size)
    assert row is not None
    return row


def to_markdown(table: dict[str, Any]) -> str:
    """The table as Markdown, with the conventions as a header paragraph."""
    head = table["header"]
    sizes, runtimes = head["sizes"], head["runtimes"]
    cols = ["Model", "Params (M)"] + [f"GFLOPs {s}" for s in sizes]
    cols += [f"{r} ms {s}" for r in runtimes for s in sizes]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table["rows"]:
        cells = [row["model"], f"{row['params'] / 1e6:.2f}"]
        cells += [f"{row['gflops'][s]:.2f}" for s in sizes]
        for r in runtimes:
            cells += [_ms(row["latency_ms"].get(r, {}).get(s)) for s in sizes]
        lines.append("| " + " | ".join(cells) + " |")
    m = head["machine"]
    notes = [f"- {r['model']}: {n}" for r in table["rows"] for n in r["notes"]]
    return "\n".join(
        [
            f"{head['flops']}. Params: {head['params']}.",
            f"Latency: {head['latency']} on {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, "
            f"onnxruntime {m['onnxruntime']}, executorch {m['executorch']}.",
            "",
            *lines,
            *([""] + notes if notes else []),
        ]
    )


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def save_table(table: dict[str, Any], json_path: Path | None, output_dir: Path | None) -> list[Path]:
    """Write the JSON (and, into `output_dir`, JSON + Markdown); returns the paths written."""
    written = []
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "cost.md").write_text(to_markdown(table) + "\n")
        written.append(output_dir / "cost.md")
        json_path = json_path or output_dir / "cost.json"
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(table, indent=1) + "\n")
        written.append(json_path)
    return written
