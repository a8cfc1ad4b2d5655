"""The "onnx" teacher backend: an ONNX model run with onnxruntime on the CPU.

Many experts are easiest to obtain as ONNX, and a frozen teacher needs no autograd. Patch
features may come from any named tensor in the graph, not only its outputs: the tensor is added
as an extra graph output (after shape inference) before the session is created.

Spec fields: `model` (the .onnx file), `patches` (tensor name; "final" = the first graph output),
`summary` (a tensor name for the class token; "" or "mean" = mean-pooled patch tokens; "cls" = the
first token of the patch tensor, for a [B, N, C] token sequence with `num_prefix` >= 1),
`resolution` (default: the model's static input side), `mean`/`std` (default ImageNet), and
`kwargs`: `input_name` (default: the first graph input), `num_prefix` (tokens to drop before
the patches when the tensor is a [B, N, C] token sequence), `channel_order` ("RGB" or "BGR", for
models trained on OpenCV images) and `threads` (onnxruntime intra-op threads; 0 = its default).

A [B, C, h, w] tensor becomes h*w patch tokens; a [B, N, C] tensor is taken as tokens on a square
grid. The teacher's stride is resolution / grid side, measured by one dry run at build time.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ..models.encoder import EncoderOutput
from ..models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from .base import Teacher, register_teacher


def _tensor_names(model: Any) -> list[str]:
    g = model.graph
    return [i.name for i in g.input] + [o for node in g.node for o in node.output if o]


def expose_tensors(model: Any, names: list[str]) -> Any:
    """Return `model` with each named intermediate tensor appended to the graph outputs."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best-effort; unknown shapes are fine for onnxruntime
        pass
    outputs = {o.name for o in model.graph.output}
    known = set(_tensor_names(model))
    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input)}
    for name in names:
        if name in outputs:
            continue
        if name not in known:
            sample = ", ".join(sorted(known)[:12])
            raise ConfigError(
                f"onnx teacher: no tensor named {name!r} in the graph (some names: {sample} ...)"
            )
        if name in infos:
            model.graph.output.append(infos[name])
        else:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        outputs.add(name)
    return model


def _as_tokens(array: np.ndarray, num_prefix: int) -> tuple[torch.Tensor, tuple[int, int]]:
    t = torch.from_numpy(np.ascontiguousarray(array)).float()
    if t.ndim == 4:  # [B, C, h, w] feature map
        b, c, h, w = t.shape
        return t.flatten(2).transpose(1, 2), (h, w)
    if t.ndim == 3:  # [B, N, C] tokens on a square grid
        t = t[:, num_prefix:]
        side = math.isqrt(t.shape[1])
        if side * side != t.shape[1]:
            raise ConfigError(
                f"onnx teacher: a token tensor with {t.shape[1]} tokens after num_prefix={num_prefix} is not a "
                "square grid; set kwargs.num_prefix to the number of class/register tokens"
            )
        return t, (side, side)
    raise ConfigError(f"onnx teacher: patch tensor must be [B,C,h,w] or [B,N,C]; got shape {tuple(t.shape)}")


class OnnxTeacher(Teacher):
    """A frozen ONNX expert (onnxruntime, CPU execution provider)."""

    def __init__(
        self,
        path: str,
        patches: str = "final",
        summary: str = "",
        resolution: int | None = None,
        mean: tuple[float, ...] = (),
        std: tuple[float, ...] = (),
        input_name: str | None = None,
        num_prefix: int = 0,
        threads: int = 0,
        channel_order: str = "RGB",
    ):
        import onnx
        import onnxruntime as ort

        if channel_order not in ("RGB", "BGR"):
            raise ConfigError(
                f"onnx teacher: kwargs.channel_order must be 'RGB' or 'BGR'; got {channel_order!r}"
            )
        bgr = channel_order == "BGR"
        if not path or not os.path.isfile(path):
            raise ConfigError(
                f"onnx teacher: model={path!r} is not a file; point it at the expert's .onnx file"
            )
        try:
            graph = onnx.load(
                path, load_external_data=False
            )  # weights stay on disk; only the graph is edited
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
        first_output = graph.graph.output[0].name
        self.patch_name = first_output if patches in ("", "final") else patches
        self.cls_name = None if summary in ("", "mean", "cls") else summary
        self.cls_token = summary == "cls"
        if self.cls_token and num_prefix < 1:
            raise ConfigError(
                "onnx teacher: summary='cls' takes the first token of the patch tensor; set kwargs.num_prefix >= 1"
            )
        graph = expose_tensors(graph, [n for n in (self.patch_name, self.cls_name) if n])
        inputs = [i for i in graph.graph.input if i.name not in {x.name for x in graph.graph.initializer}]
        self.input_name = input_name or inputs[0].name
        shape = next((i.type.tensor_type.shape.dim for i in inputs if i.name == self.input_name), None)
        if shape is None:
            raise ConfigError(
                f"onnx teacher: no input named {self.input_name!r}; inputs: {[i.name for i in inputs]}"
            )
        self.fixed_batch = shape[0].dim_value if shape[0].HasField("dim_value") else 0
        if resolution is None:
            side = shape[-1].dim_value if shape[-1].HasField("dim_value") else 0
            if not side:
                raise ConfigError(
                    "onnx teacher: the model's input size is dynamic; set resolution=<input side>"
                )
            resolution = int(side)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Weights in external files (large experts, > 2 GB protobufs) stay on disk, found beside the
        # original file while the edited graph itself is passed as bytes.
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", os.path.dirname(os.path.abspath(path))
        )
        self.session = ort.InferenceSession(
            graph.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.num_prefix = num_prefix
        # One dry run measures the grid (hence the stride) and the widths.
        dry = self._run(np.zeros((1, 3, resolution, resolution), np.float32))
        patch_tokens, grid = _as_tokens(dry[0], num_prefix)
        if self.cls_token and np.ndim(dry[0]) != 3:
            raise ConfigError("onnx teacher: summary='cls' needs a [B, N, C] token tensor as `patches`")
        stride = resolution // grid[0]
        super().__init__(resolution, stride, tuple(mean) or IMAGENET_MEAN, tuple(std) or IMAGENET_STD, None)
        self.path = path
        self.bgr = bgr
        self.patch_dim = int(patch_tokens.shape[-1])
        self.cls_dim = int(dry[1].reshape(1, -1).shape[1]) if self.cls_name else self.patch_dim

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        names = [self.patch_name] + ([self.cls_name] if self.cls_name else [])
        if self.fixed_batch == 1 and images.shape[0] > 1:  # exported with batch 1: one image at a time
            parts = [
                self.session.run(names, {self.input_name: images[i : i + 1]}) for i in range(len(images))
            ]
            return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]
        return self.session.run(names, {self.input_name: images})

    def compile_encode(self) -> None:
        """onnxruntime runs the graph; there is no torch module to compile."""

    def encode(self, images: torch.Tensor) -> EncoderOutput:
        if self.bgr:  # mean/std are given in RGB order and applied before the swap
            images = images.flip(1)
        arrays = self._run(images.detach().float().cpu().numpy())
        patches, grid = _as_tokens(arrays[0], self.num_prefix)
        if self.cls_token:
            cls = torch.from_numpy(np.ascontiguousarray(arrays[0][:, 0])).float()
        elif self.cls_name:
            cls = torch.from_numpy(np.ascontiguousarray(arrays[1])).float().reshape(len(images), -1)
        else:
            cls = patches.mean(dim=1)
        device = images.device
        return EncoderOutput(cls=cls.to(device), patches=patches.to(device), registers=None, grid=grid)


@register_teacher("onnx")
def build_onnx_teacher(
    model: str = "",
    checkpoint: str | None = None,
    resolution: int | None = None,
    summary: str = "",
    patches: str = "final",
    mean: tuple[float, ...] = (),
    std: tuple[float, ...] = (),
    kwargs: dict[str, Any] | None = None,
    dtype: str = "fp32",
    **_ignored: Any,
) -> OnnxTeacher:
    """`model` (or `checkpoint`) is the .onnx file; `dtype` is ignored (onnxruntime runs the graph as stored)."""
    extra = dict(kwargs or {})
    known = {"input_name", "num_prefix", "threads", "channel_order"}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ConfigError(f"onnx teacher: unknown kwargs {unknown}; known: {', '.join(sorted(known))}")
    return OnnxTeacher(model or checkpoint or "", patches, summary, resolution, mean, std, **extra)
