"""Export round-trips (ONNX, torch.export, ExecuTorch) verified against eager fp32, the sidecar, and
the failure paths. Inputs are 64x64 so the full ViT-T and ConvNeXt-T stay quick; ExecuTorch lowering
is slower, so its round-trip uses the same architectures with fewer blocks."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

import eupe
from eupe.deploy.export import export_model
from eupe.errors import EupeError
from eupe.models import EncoderOutput

SIZE = 64
HAS_EXECUTORCH = importlib.util.find_spec("executorch") is not None
needs_executorch = pytest.mark.skipif(
    not HAS_EXECUTORCH, reason="executorch not installed (pip install 'eupe[export]')"
)


def _model(name: str, **overrides) -> eupe.Encoder:
    torch.manual_seed(0)
    return eupe.create_model(name, **overrides).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, eupe.Encoder]:
    return {name: _model(name) for name in ("eupe_vitt16", "eupe_convnext_tiny")}


def _eager(model: eupe.Encoder, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    return [t for t in (out.cls, out.patches, out.registers) if t is not None]


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """Each (model, format) exported once per module; the sidecar test reuses the ViT-T ONNX."""
    root, cache = tmp_path_factory.mktemp("exports"), {}

    def get(name: str, fmt: str):
        if (name, fmt) not in cache:
            cache[name, fmt] = export_model(models[name], fmt, size=SIZE, output=root / f"{name}.{fmt}")
        return cache[name, fmt]

    return get


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("name", ["eupe_vitt16", "eupe_convnext_tiny"])
def test_round_trip_matches_eager(models, exported, name, fmt):
    model = models[name]
    result = exported(name, fmt)
    assert result.artifact.is_file() and result.max_abs_diff <= 1e-4

    # Reload the artifact on its own, on a batch the exporter never saw.
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(result.artifact), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"]
        got = [torch.from_numpy(a) for a in session.run(None, {"images": x.numpy()})]
        names = [o.name for o in session.get_outputs()]
    else:
        got = list(torch.export.load(str(result.artifact)).module()(x))
        names = [o["name"] for o in result.info["outputs"]]
    want = _eager(model, x)
    assert names == (["cls", "patches", "registers"] if model.num_registers else ["cls", "patches"])
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert (g - w).abs().max() <= 1e-4


def test_sidecar_contents(exported):
    result = exported("eupe_vitt16", "onnx")
    assert result.sidecar.name == result.artifact.name + ".json"
    info = json.loads(result.sidecar.read_text())
    assert info["format"] == "onnx" and info["opset"] >= 17 and info["model"] == "eupe_vitt16"
    assert info["input"]["name"] == "images" and info["input"]["shape"] == [1, 3, SIZE, SIZE]
    assert info["input"]["multiple_of"] == 16
    np.testing.assert_allclose(info["input"]["mean"], [0.485, 0.456, 0.406])
    np.testing.assert_allclose(info["input"]["std"], [0.229, 0.224, 0.225])
    grid = (SIZE // 16) ** 2
    assert info["outputs"] == [
        {"name": "cls", "shape": [1, 192]},
        {"name": "patches", "shape": [1, grid, 192]},
        {"name": "registers", "shape": [1, 4, 192]},
    ]
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["onnxruntime"]
    ver = info["verification"]
    assert (
        ver["passed"]
        and ver["tolerance"] == 1e-4
        and set(ver["max_abs_diff"]) == {"cls", "patches", "registers"}
    )
    assert max(ver["max_abs_diff"].values()) <= 1e-4 and len(info["sha256"]) == 64


def test_onnx_dynamic_vit_runs_other_sizes(tmp_path):
    """The RoPE grid is traced from the input H/W, so one graph serves every size."""
    import onnxruntime as ort

    model = _model("eupe_vitt16", depth=1)
    result = export_model(model, "onnx", size=SIZE, output=tmp_path / "d.onnx", dynamic=True)
    assert result.info["dynamic"]["enabled"] and result.info["input"]["shape"][0] == "batch"
    session = ort.InferenceSession(str(result.artifact), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 48, 96)
    got = session.run(None, {"images": x.numpy()})
    for g, w in zip(got, _eager(model, x), strict=True):
        assert g.shape == tuple(w.shape) and np.abs(g - w.numpy()).max() <= 1e-4


def test_pt2_dynamic_vit_fails_clearly(tmp_path):
    with pytest.raises(EupeError, match="RoPE patch grid.*--format onnx --dynamic"):
        export_model(
            _model("eupe_vitt16", depth=1), "pt2", size=SIZE, output=tmp_path / "d.pt2", dynamic=True
        )
    assert not (tmp_path / "d.pt2").exists()


class _ZetaEncoder(torch.nn.Module):
    """An encoder using an operator ONNX has no translation for (torch.special.zeta)."""

    arch, stride, num_registers, family = "zeta_encoder", 16, 0, "vit"

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 8, 16, 16)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        x = self.proj(images).flatten(2).transpose(1, 2)
        x = torch.special.zeta(x.abs() + 2.0, torch.ones_like(x))
        return EncoderOutput(cls=x.mean(1), patches=x, registers=None, grid=(2, 2))


def test_unsupported_op_names_the_op(tmp_path):
    with pytest.raises(EupeError, match=r"zeta_encoder to onnx: operator \S*zeta\S* is not supported"):
        export_model(_ZetaEncoder(), "onnx", size=32, output=tmp_path / "z.onnx")


def test_verification_failure_reports_difference_and_removes_artifact(tmp_path):
    model = _model("eupe_vitt16", depth=1)
    with pytest.raises(EupeError, match=r"does not match eager fp32: max abs diff cls=.* > 1e-12"):
        export_model(model, "onnx", size=32, output=tmp_path / "t.onnx", tolerance=1e-12)
    assert not (tmp_path / "t.onnx").exists()


def test_bad_arguments(models, tmp_path):
    vit = models["eupe_vitt16"]
    with pytest.raises(EupeError, match="not a positive multiple of the stride 16; try 64"):
        export_model(vit, "onnx", size=70, output=tmp_path / "x.onnx")
    with pytest.raises(EupeError, match="executorch .* only"):
        export_model(vit, "onnx", size=64, quantize="int8", output=tmp_path / "x.onnx")
    with pytest.raises(EupeError, match="unknown export format 'tflite'"):
        export_model(vit, "tflite", size=64)


@needs_executorch
@pytest.mark.parametrize(
    "name,overrides", [("eupe_vitt16", {"depth": 1}), ("eupe_convnext_tiny", {"depths": (1, 1, 1, 1)})]
)
def test_executorch_xnnpack_round_trip(tmp_path, name, overrides):
    model = _model(name, **overrides)
    result = export_model(model, "executorch", size=SIZE, output=tmp_path / "m.pte")
    assert result.max_abs_diff <= 1e-4 and result.artifact.read_bytes()[4:8] == b"ET12"
    info = result.info
    assert "XNNPACK" in info["runtime"] and info["versions"]["executorch"]
    # LayerNorm is not an XNNPACK op in ExecuTorch 1.5: it must be reported, not hidden.
    assert any("layer_norm" in op for op in info["non_delegated_ops"])


@pytest.mark.slow
@needs_executorch
def test_executorch_int8_reports_cosine(tmp_path):
    model = _model("eupe_convnext_tiny", depths=(1, 1, 1, 1))
    result = export_model(
        model, "executorch", size=SIZE, output=tmp_path / "q.pte", quantize="int8", calibration=2
    )
    quant = result.info["quantization"]
    assert set(quant["cosine_to_fp32"]) == {"cls", "patches"} and "PT2E" in quant["scheme"]
    assert min(quant["cosine_to_fp32"].values()) >= quant["min_cosine"] == 0.9
    assert result.info["verification"]["tolerance"] is None  # int8 is judged by cosine, not 1e-4
