"""`eupe export --format hf`: a transformers DINOv3 folder that AutoModel loads, equal to eager,
and that `create_model(DIR)` reads back (fixture weights for ViT-T/S and ConvNeXt-T; ViT-B seeded)."""

from __future__ import annotations

import json

import pytest
import torch

from eupe.cli import main
from eupe.deploy.export import export_model
from eupe.models import create_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["eupe_vitt16", "eupe_vits16", "eupe_vitb16", "eupe_convnext_tiny"])
def test_hf_export_round_trips_through_automodel(name, official_pth, tmp_path, one_torch_thread) -> None:
    torch.manual_seed(0)
    model = create_model(name, weights=official_pth.get(name)).eval()
    result = export_model(model, "hf", size=64, output=tmp_path / "hf", source=name)
    assert result.max_abs_diff <= 1e-4 and result.info["verification"]["passed"]
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["format"] == "hf" and "transformers" in sidecar["runtime"]

    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == ("DINOv3ConvNextModel" if "convnext" in name else "DINOv3ViTModel")
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))  # not square on purpose
    with torch.no_grad():
        want, tokens = model(x), hf(pixel_values=x).last_hidden_state
        again = create_model(str(tmp_path / "hf")).eval()(x)
    r = model.num_registers
    assert (tokens[:, 0] - want.cls).abs().max() <= 1e-4
    assert (tokens[:, 1 + r :] - want.patches).abs().max() <= 1e-4
    assert torch.equal(again.cls, want.cls) and torch.equal(again.patches, want.patches)


def test_hf_export_cli_and_bad_folders(tmp_path, capsys) -> None:
    assert (
        main(["export", "eupe_vitp16", "--format", "hf", "--size", "32", "--output", str(tmp_path / "p")])
        == 0
    )
    out = capsys.readouterr().out
    assert "AutoModel.from_pretrained" in out and (tmp_path / "p.json").is_file()
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["eupe_arch"] == "eupe_vitp16" and config["model_type"] == "dinov3_vit"
    del config["eupe_arch"]  # a DINOv3 folder eupe did not write
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    assert (
        main(["export", str(tmp_path / "p"), "--format", "onnx", "--output", str(tmp_path / "x.onnx")]) == 2
    )
    assert "without `eupe_arch`" in capsys.readouterr().err
