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


def test_figures_are_written(tmp_path: Path):
    import json

    import numpy as np
    import torch.nn.functional as F

    from eupe.demo import figures
    from eupe.models.encoder import feature_map_to_output

    run = tmp_path / "stage1"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": i, "loss": 1.0 / i}) for i in range(1, 6))
    )
    scores = {"a": {"knn": 0.5, "text_iou": 0.2, "pck": 0.7}, "b": {"knn": 0.3, "text_iou": 0.6, "pck": 0.4}}
    model = lambda x: feature_map_to_output(F.avg_pool2d(x, 8))  # noqa: E731
    images = np.random.default_rng(0).integers(0, 255, size=(2, 32, 32, 3), dtype=np.uint8)
    for path in (
        figures.loss_curves({"stage1": run}, tmp_path / "loss.png"),
        figures.radar(scores, tmp_path / "radar.png"),
        figures.pca_grid({"m": model}, images, tmp_path / "pca.png", cell=32),
    ):
        assert path.stat().st_size > 1000
