"""Verified export of an encoder to ONNX, ExecuTorch (XNNPACK) or a torch.export program.

Every artifact is run in its own runtime on a fixed batch and compared with eager fp32 PyTorch
before the command succeeds; the JSON sidecar next to it records what a deployer needs (input
size and normalization, output names and shapes, versions, the measured difference).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..errors import EupeError
from ..files import file_sha256
from . import runtimes as rt

FORMATS = {"onnx": ".onnx", "executorch": ".pte", "pt2": ".pt2", "hf": "_hf"}  # hf: a folder
TOLERANCE = 1e-4
ONNX_OPSET = 18
SEED = 0
# Symbolic grids: the ViTs' RoPE and the ConvNeXt pooling read H/W from the traced input shape.
DYNAMIC_NOTE = (
    "traced shapes: batch, height and width are symbolic in the graph (H, W multiples of the "
    "stride); the ViT RoPE patch grid is computed inside the graph from the input's H/W, so there "
    "are no extra grid inputs"
)


@dataclass
class ExportResult:
    """What `export_model` wrote and measured (the sidecar holds the same facts)."""

    artifact: Path
    sidecar: Path
    max_abs_diff: float
    info: dict[str, Any]


def default_output(arch: str, fmt: str, size: int, dynamic: bool, quantize: str | None) -> Path:
    suffix = ("_dynamic" if dynamic else "") + (f"_{quantize}" if quantize else "")
    return Path(f"{arch}_{size}{suffix}{FORMATS[fmt]}")


def _check_args(model: nn.Module, fmt: str, size: int, quantize: str | None, batch: int) -> None:
    if fmt not in FORMATS:
        raise EupeError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    stride = getattr(model, "stride", None)
    if stride is None or not hasattr(model, "num_registers"):
        raise EupeError(f"{type(model).__name__}: export needs an eupe Encoder (stride, num_registers)")
    if size <= 0 or size % stride:
        nearest = max(stride, round(size / stride) * stride)
        raise EupeError(f"--size {size} is not a positive multiple of the stride {stride}; try {nearest}")
    if quantize not in (None, "int8"):
        raise EupeError(f"--quantize {quantize!r} is not supported; the only choice is int8")
    if quantize and fmt != "executorch":
        raise EupeError("--quantize int8 is available for --format executorch (PT2E + XNNPACK) only")
    if batch < 1:
        raise EupeError(f"--batch must be >= 1, got {batch}")


def verification_inputs(size: int, stride: int, batch: int, dynamic: bool) -> list[torch.Tensor]:
    """The fixed batch (seed 0), plus for dynamic exports a second batch size and a non-square H/W."""
    gen = torch.Generator().manual_seed(SEED)
    # Batch 2 for the traced example: torch.export specializes a dimension of size 1.
    first = torch.randn(max(batch, 2) if dynamic else batch, 3, size, size, generator=gen)
    if not dynamic:
        return [first]
    other_h = max(stride, (size // 2) // stride * stride)
    return [first, torch.randn(1, 3, other_h, size + stride, generator=gen)]


def _max_diffs(got: list[torch.Tensor], want: list[torch.Tensor], names: list[str]) -> dict[str, float]:
    if len(got) != len(want):
        raise EupeError(f"the exported graph returned {len(got)} outputs, expected {len(want)} ({names})")
    diffs = {}
    for name, g, w in zip(names, got, want):
        if tuple(g.shape) != tuple(w.shape):
            raise EupeError(f"output {name}: exported shape {tuple(g.shape)} != eager {tuple(w.shape)}")
        diffs[name] = float((g.float() - w.float()).abs().max())
    return diffs


def _cosines(got: list[torch.Tensor], want: list[torch.Tensor], names: list[str]) -> dict[str, float]:
    return {
        n: float(torch.nn.functional.cosine_similarity(g.float(), w.float(), dim=-1).mean())
        for n, g, w in zip(names, got, want)
    }


def _shape(t: torch.Tensor, dynamic: bool, name: str) -> list[int | str]:
    shape: list[int | str] = list(t.shape)
    if dynamic:
        shape[0] = "batch"
        if name == "patches":
            shape[1] = "(height/stride)*(width/stride)"
    return shape


def _quantize_int8(program: torch.export.ExportedProgram, example: torch.Tensor, calibration: int):
    """PT2E int8: XNNPACK symmetric per-channel weights, per-tensor activations, calibrated on
    `calibration` seeded N(0,1) batches (a stand-in for normalized images; use real images for a
    production model)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(program.module(), quantizer)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for _ in range(calibration):
            prepared(torch.randn(example.shape, generator=gen))
        prepared(example)
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, (example,))


def export_model(
    model: nn.Module,
    fmt: str,
    *,
    size: int = 256,
    output: str | os.PathLike | None = None,
    dynamic: bool = False,
    batch: int = 1,
    quantize: str | None = None,
    tolerance: float = TOLERANCE,
    min_cosine: float = 0.9,
    calibration: int = 8,
    threads: int | None = None,
    source: str | None = None,
) -> ExportResult:
    """Export `model` (an eupe `Encoder`), verify the artifact in its runtime, write the sidecar.

    Raises EupeError when the exporter cannot handle an operator (naming it), or when the
    artifact's outputs differ from eager fp32 by more than `tolerance` (int8: when the mean
    cosine similarity to fp32 falls below `min_cosine`). A failed artifact is deleted.
    """
    _check_args(model, fmt, size, quantize, batch)
    arch = getattr(model, "arch", type(model).__name__)
    model = model.float().eval().to("cpu")
    threads = threads or torch.get_num_threads()
    names = rt.output_names(model)
    path = Path(output) if output else default_output(arch, fmt, size, dynamic, quantize)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = verification_inputs(size, model.stride, batch, dynamic)
    example = inputs[0]
    info: dict[str, Any] = {"format": fmt}

    if fmt == "onnx":
        rt.export_onnx(model, example, path, dynamic, ONNX_OPSET)
        runner = rt.onnx_runner(path, threads)
        info["opset"] = ONNX_OPSET
        info["runtime"] = f"onnxruntime {rt.version('onnxruntime')} CPUExecutionProvider"
    elif fmt == "hf":
        from ..models.hf import save_hf

        save_hf(model, path)
        runner = rt.hf_runner(path, names)
        info["runtime"] = f"transformers {rt.version('transformers')} AutoModel.from_pretrained"
    elif fmt == "pt2":
        torch.export.save(rt.export_program(model, example, dynamic, "pt2"), str(path))
        runner = rt.pt2_runner(path)
        info["runtime"] = f"torch.export.load (torch {torch.__version__})"
    else:
        rt.require_executorch()
        program = rt.export_program(rt.explicit_attention(model), example, dynamic, "executorch")
        program = rt.fold_constants(program)
        if quantize:
            program = _quantize_int8(program, example, calibration)
        buffer, leftover = rt.lower_executorch(program, arch)
        path.write_bytes(buffer)
        runner = rt.executorch_runner(path, threads)
        info["runtime"] = f"executorch {rt.version('executorch')} Python runtime, XNNPACK backend"
        info["delegate"] = "XnnpackPartitioner (to_edge_transform_and_lower)"
        info["non_delegated_ops"] = leftover

    diffs: dict[str, float] = {}
    cosines: dict[str, float] = {}
    shapes = []
    for x in inputs:
        want = rt.eager_runner(model)(x)
        try:
            got = runner(x)
        except Exception as e:  # a runtime rejecting the input is a failed verification too
            _discard(path)
            raise EupeError(
                f"{fmt} artifact of {arch} failed to run on input {list(x.shape)} in {info['runtime']}: "
                f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            ) from None
        for name, d in _max_diffs(got, want, names).items():
            diffs[name] = max(d, diffs.get(name, 0.0))
        if quantize:
            for name, c in _cosines(got, want, names).items():
                cosines[name] = min(c, cosines.get(name, 1.0))
        shapes.append(list(x.shape))
    worst = max(diffs.values())
    if quantize and min(cosines.values()) < min_cosine:
        _discard(path)
        raise EupeError(
            f"int8 {arch} is too far from fp32: cosine similarity {_fmt(cosines)} < {min_cosine} "
            "(calibrate on real images or export fp32)"
        )
    if not quantize and worst > tolerance:
        _discard(path)
        raise EupeError(
            f"{fmt} export of {arch} does not match eager fp32: max abs diff {_fmt(diffs)} > {tolerance} "
            f"on inputs {shapes}"
        )

    info.update(
        {
            "artifact": path.name,
            "sha256": file_sha256(path / "model.safetensors" if path.is_dir() else path),
            "bytes": sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size,
            "model": arch,
            "source": source or arch,
            "input": {
                "name": "images",
                "shape": ["batch", 3, "height", "width"] if dynamic else [batch, 3, size, size],
                "size": size,
                "multiple_of": model.stride,
                "dtype": "float32",
                "layout": "NCHW, RGB",
                "normalized": "yes: feed (pixels/255 - mean) / std; the graph does not normalize",
                "mean": list(IMAGENET_DEFAULT_MEAN),
                "std": list(IMAGENET_DEFAULT_STD),
            },
            "outputs": [
                {"name": n, "shape": _shape(t, dynamic, n)}
                for n, t in zip(names, rt.eager_runner(model)(example))
            ],
            "dynamic": {"enabled": dynamic, "how": DYNAMIC_NOTE if dynamic else "static shapes"},
            "versions": {
                **{
                    p: rt.version(p)
                    for p in ("eupe", "timm", "onnx", "onnxruntime", "executorch", "transformers")
                },
                "torch": torch.__version__,
            },
            "verification": {
                "reference": "eager PyTorch fp32 on CPU",
                "inputs": shapes,
                "seed": SEED,
                "max_abs_diff": diffs,
                "tolerance": None if quantize else tolerance,
                "passed": True,
            },
        }
    )
    if quantize:
        info["quantization"] = {
            "scheme": "int8 PT2E, XNNPACKQuantizer symmetric (per-channel weights, per-tensor activations)",
            "calibration": f"{calibration} seeded N(0,1) batches of shape {list(example.shape)}",
            "cosine_to_fp32": cosines,
            "min_cosine": min_cosine,
        }
    sidecar = Path(str(path) + ".json")
    sidecar.write_text(json.dumps(info, indent=1) + "\n")
    return ExportResult(artifact=path, sidecar=sidecar, max_abs_diff=worst, info=info)


def _discard(path: Path) -> None:
    """Remove a failed artifact (a file, or an hf folder)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in values.items())
