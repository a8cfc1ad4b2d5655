"""The demo pipeline's stage configs are valid distill configs (no training here: that is `eupe demo --quick`)."""

from __future__ import annotations

from pathlib import Path

from eupe.demo.experts import effnet_teacher_spec, ocr_teacher_spec
from eupe.demo.pipeline import DemoSettings, _spec_dict, _stage_config, quick_settings
from eupe.distill.config import load_config


def test_every_stage_config_validates(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("eupe.demo.experts.ocr_det_model", lambda: tmp_path / "det.onnx")
    for s in (DemoSettings(), quick_settings()):
        experts = {
            "effnet": _spec_dict(effnet_teacher_spec(tmp_path / "e.safetensors"), s.effnet_resolution),
            "ocr": _spec_dict(ocr_teacher_spec(), s.ocr_resolution),
        }
        proxy = {"proxy": {"backend": "eupe", "checkpoint": str(tmp_path / "stage1" / "final")}}
        s1 = _stage_config(
            s, tmp_path, "stage1", experts, {"name": s.proxy, "resolution": s.proxy_resolution}, 5
        )
        s3 = _stage_config(
            s, tmp_path, "stage3", proxy, {"name": s.student, "init": str(tmp_path / "s2")}, 5,
            stage="pyramid", pyramid=list(s.pyramid),
        )  # fmt: skip
        cfg1, cfg3 = load_config(s1), load_config(s3)
        assert set(cfg1.teachers) == {"effnet", "ocr"} and cfg1.teachers["ocr"].kwargs == {
            "channel_order": "BGR"
        }
        assert cfg1.teachers["effnet"].resolution % 32 == 0 and cfg1.train.global_batch == s.batch
        assert cfg3.stage == "pyramid" and cfg3.pyramid == list(s.pyramid)
        assert cfg1.data.sources[0].path == str(tmp_path / "data" / "pool")
