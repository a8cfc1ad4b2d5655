"""One surface over the deployment runtimes: build an artifact, load it, run it on a tensor.

`export.py` (artifacts + verification), `cost.py` (latency column) and the benchmark all call
these, so a runtime is exported, threaded and timed the same way everywhere.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import EupeError

Runner = Callable[[torch.Tensor], list[torch.Tensor]]
RUNTIMES = ("eager", "compile", "onnx", "executorch", "pt2", "executorch_int8")
OUTPUT_NAMES = ("cls", "patches", "registers")
_OP = re.compile(r"(?:aten|prims|quantized_decomposed|torchvision)(?:::|\.)[A-Za-z_][\w.]*")


class ExportWrapper(nn.Module):
    """Turn `model(images) -> EncoderOutput` into the flat tuple `(cls, patches[, registers])`.

    Exporters need a tuple of tensors; the order here is the order of the graph outputs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        return (out.cls, out.patches) + ((out.registers,) if out.registers is not None else ())


def output_names(model: nn.Module) -> list[str]:
    """`cls`, `patches`, and `registers` where the model has them."""
    return list(OUTPUT_NAMES if getattr(model, "num_registers", 0) else OUTPUT_NAMES[:2])


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def failing_op(error: BaseException) -> str | None:
    """The first operator named in an exporter's error message, e.g. `aten::linalg_svd`."""
    match = _OP.search(str(error))
    return match.group(0) if match else None


def export_failure(fmt: str, arch: str, error: BaseException, hint: str = "") -> BaseException:
    """An exporter's exception as one EupeError line that names the operator when it can.

    A missing optional package (onnxscript, executorch, ...) is returned as it is: it is not the
    model's fault, and the CLI turns it into the line that names the extra to install."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        return error
    op = failing_op(error)
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    what = f"operator {op} is not supported" if op else f"{type(error).__name__}: {first}"
    return EupeError(f"cannot export {arch} to {fmt}: {what}{'; ' + hint if hint else ''} ({first})")


# -- torch.export ---------------------------------------------------------------------------------
def dynamic_shapes(stride: int, max_side: int = 2048) -> dict:
    """Batch and H/W symbolic; H and W are multiples of the model's stride (what it accepts)."""
    dim = torch.export.Dim
    hk = dim("h_patches", min=1, max=max_side // stride)
    wk = dim("w_patches", min=1, max=max_side // stride)
    return {"images": {0: dim("batch", min=1, max=64), 2: stride * hk, 3: stride * wk}}


def export_program(
    model: nn.Module, example: torch.Tensor, dynamic: bool, fmt: str = "pt2"
) -> torch.export.ExportedProgram:
    """`torch.export` of the wrapped model; a failure names the operator."""
    if dynamic and getattr(model, "family", None) == "vit":
        raise EupeError(
            f"cannot export {model.arch} to {fmt} with --dynamic: torch.export specializes the RoPE "
            "patch grid (timm's _build_grid calls float() on the grid size), so the program only "
            "runs at the traced size; use --format onnx --dynamic (its exporter keeps the grid "
            "symbolic) or export one fixed --size per resolution"
        )
    wrapper = ExportWrapper(model).eval()
    shapes = dynamic_shapes(model.stride) if dynamic else None
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, (example,), dynamic_shapes=shapes)
    except Exception as e:  # torch.export raises many types; all become one line
        raise export_failure(fmt, getattr(model, "arch", type(model).__name__), e) from None


# -- ONNX -----------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool, opset: int = 18) -> None:
    """ONNX via the torch.export-based exporter (opset >= 17), weights embedded in one file."""
    if opset < 17:
        raise EupeError(f"ONNX opset must be >= 17 (LayerNormalization is a native op from 17); got {opset}")
    wrapper = ExportWrapper(model).eval()
    names = output_names(model)
    arch = getattr(model, "arch", type(model).__name__)
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                input_names=["images"],
                output_names=names,
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes=dynamic_shapes(model.stride) if dynamic else None,
                verbose=False,
            )
    except Exception as e:
        cause = e.__cause__ or e
        raise export_failure("onnx", arch, cause if failing_op(cause) else e) from None


def onnx_runner(path: Path, threads: int) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(a) for a in session.run(None, {"images": images.numpy()})]

    return run


# -- ExecuTorch -----------------------------------------------------------------------------------
def require_executorch() -> str:
    """ExecuTorch's version, or an EupeError saying how to install a working one."""
    installed = version("executorch")
    if installed is None:
        raise EupeError(
            "ExecuTorch is not installed; install the export extra: pip install 'eupe[export]' "
            "(tested: executorch 1.5.1 with torch 2.15.0)"
        )
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
        from executorch.exir import to_edge_transform_and_lower  # noqa: F401
        from executorch.runtime import Runtime  # noqa: F401
    except Exception as e:  # a wheel built against another torch fails at import with any error
        raise EupeError(
            f"ExecuTorch {installed} does not work with torch {torch.__version__} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
            "tested combination: executorch 1.5.1 + torch 2.15.0"
        ) from None
    return installed


def explicit_attention(model: nn.Module) -> nn.Module:
    """A copy of `model` whose timm attention runs as matmul-softmax-matmul instead of SDPA.

    Same math; but torch.export decomposes SDPA with a "safe softmax" (eq/any/where/full_like over
    the whole attention matrix) that XNNPACK cannot take, leaving it on ExecuTorch's slow portable
    kernels (measured: ViT-T 256 ran ~5x slower than eager).
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def fold_constants(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Precompute weight-only subgraphs (the ViTs' concatenated q/k/v bias with its masked key
    part), so the qkv projection is a plain linear that XNNPACK (and the int8 quantizer) take,
    instead of a portable fp32 `addmm` (measured: ~5x slower than eager for ViT-T, int8 ~6x)."""
    require_executorch()
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    return constant_prop_pass(program)


def lower_executorch(program: torch.export.ExportedProgram, arch: str) -> tuple[bytes, dict[str, int]]:
    """XNNPACK-delegated `.pte` bytes, plus the ops left on ExecuTorch's portable kernels.

    The leftover ops are reported, not hidden: XNNPACK has no LayerNorm in ExecuTorch 1.5, so ViTs
    and ConvNeXts keep `native_layer_norm` (and the ViTs their RoPE slicing) on portable kernels.
    """
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        import executorch.kernels.quantized  # noqa: F401  # out-variants of int8 (de)quantize ops

        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        graph = edge.exported_program().graph_module.graph
        leftover = Counter(
            _op_name(n.target)
            for n in graph.nodes
            if n.op == "call_function" and _op_name(n.target) not in _BOOKKEEPING
        )
        return edge.to_executorch().buffer, dict(sorted(leftover.items()))
    except EupeError:
        raise
    except Exception as e:
        hint = (
            "XNNPACK supports one dynamic dimension per reshape; export this model with a fixed size"
            if "dynamic dimension" in str(e)
            else ""
        )
        raise export_failure("executorch", arch, e, hint) from None


_BOOKKEEPING = {"getitem", "executorch_call_delegate", "sym_size.int", "mul", "add", "floordiv"}


def _op_name(target: object) -> str:
    name = getattr(target, "__name__", None) or str(target)
    text = str(target)
    if text.startswith("<EdgeOpOverload: aten."):
        return text.split(":")[1].strip().removeprefix("aten.").removesuffix(">")
    return name.removeprefix("aten.")


def executorch_runner(path: Path, threads: int) -> Runner:
    require_executorch()
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(threads)  # XNNPACK's pool; default is every core
    method = Runtime.get().load_program(Path(path)).load_method("forward")

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        return list(method.execute([images.contiguous()]))

    return run


# -- eager / compile / pt2 ------------------------------------------------------------------------
def module_runner(module: nn.Module) -> Runner:
    def run(images: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            return list(module(images))

    return run


def eager_runner(model: nn.Module) -> Runner:
    return module_runner(ExportWrapper(model).eval())


def features_runner(model: nn.Module) -> Runner:
    """Eager `forward_features` of a plain timm model (the reference rows of the cost table)."""

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [model.forward_features(images)]

    return run


def compile_runner(model: nn.Module) -> Runner:
    return module_runner(torch.compile(ExportWrapper(model).eval(), dynamic=False))


def hf_runner(path: Path, names: list[str]) -> Runner:
    """A transformers folder through `AutoModel`: `last_hidden_state` is [cls, registers, patches]
    (ViT) or [pooled, patches] (ConvNeXt), split into the export's outputs."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path)).eval()
    registers = int(getattr(model.config, "num_register_tokens", 0) or 0)

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            tokens = model(pixel_values=images).last_hidden_state
        out = {
            "cls": tokens[:, 0],
            "patches": tokens[:, 1 + registers :],
            "registers": tokens[:, 1 : 1 + registers],
        }
        return [out[n] for n in names]

    return run


def pt2_runner(path: Path) -> Runner:
    return module_runner(torch.export.load(str(path)).module())
