"""All seven `eupe eval` commands end to end on generated data in the real layouts.

Models come in every accepted form: a save_pretrained folder (+ adapter heads), a zoo name with an
official-layout .pth, and a bare timm name (random init, recorded in results.json).
"""

from __future__ import annotations

import json

import pytest
import torch

from eupe.cli import main

from .test_eval_data import make_ade20k, make_class_folders, make_nyu, make_spair, save_tiny_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    save_tiny_encoder(root / "tiny", seed=0)
    save_tiny_encoder(root / "tiny2", seed=1)
    make_class_folders(root / "imagenet", classes=3, per_class=2)
    make_ade20k(root / "ade", n_train=2, n_val=1, size=32)
    make_nyu(root / "nyu", n_train=2, n_test=1, h=32, w=48)
    make_spair(root / "spair", categories=("cat",), pairs=1, size=64)
    return root


def _run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _results(path):
    return json.loads((path / "results.json").read_text())


def test_knn_cli(world, tmp_path, capsys):
    args = ["eval", "knn", "--model", world / "tiny", "--data", world / "imagenet", "--output-dir", tmp_path]
    code, out, _ = _run([*args, "resolution=32", "resize=32", "num_workers=0", "k=[1,3]"], capsys)
    assert code == 0 and "knn" in out
    r = _results(tmp_path)
    assert r["task"] == "knn" and 0 <= r["value"] <= 1 and set(r["extra"]["top1_by_k"]) == {"1", "3"}
    assert r["settings"]["k"] == [1, 3] and r["extra"]["model_info"]["random_init"] is False


def test_bad_setting_is_one_line_error(world, tmp_path, capsys):
    args = ["eval", "knn", "--model", world / "tiny", "--data", world / "imagenet", "--output-dir", tmp_path]
    code, _, err = _run([*args, "itrations=3"], capsys)
    assert code == 2 and "unknown setting(s) itrations" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(["eval", "seg", "--model", world / "tiny", "--data", world / "nowhere"], capsys)
    assert code == 2 and "no such folder" in err


def test_seg_cli_without_cache(world, tmp_path, capsys):
    args = ["eval", "seg", "--model", world / "tiny", "--data", world / "ade", "--output-dir", tmp_path]
    settings = ["resolution=32", "iterations=3", "batch_size=2", "warmup_iters=100", "max_val_images=1"]
    settings.append("num_workers=0")
    code, out, _ = _run([*args, *settings], capsys)
    r = _results(tmp_path)
    assert code == 0 and r["metric"] == "mIoU" and 0 <= r["value"] <= 1
    assert r["settings"]["warmup_iters"] == 100 and r["extra"]["cache_seconds"] == 0.0


def test_depth_cli(world, tmp_path, capsys):
    args = ["eval", "depth", "--model", world / "tiny", "--data", world / "nyu", "--output-dir", tmp_path]
    code, out, _ = _run([*args, "resolution=32", "iterations=3", "batch_size=2", "num_workers=0"], capsys)
    r = _results(tmp_path)
    assert code == 0 and r["metric"] == "rmse" and r["value"] > 0 and "m" in out
    assert {"abs_rel", "delta1"} <= set(r["extra"])


def test_spair_cli_with_a_bare_timm_name(world, tmp_path, capsys):
    args = [
        "eval",
        "spair",
        "--model",
        "vit_tiny_patch16_224",
        "--data",
        world / "spair",
        "--output-dir",
        tmp_path,
    ]
    code, _, _ = _run([*args, "resolution=64"], capsys)
    r = _results(tmp_path)
    assert code == 0 and r["value"] == 1.0  # identical pairs, whatever the (random) features
    assert r["extra"]["model_info"]["random_init"] is True and r["extra"]["model_info"]["mean"] == [0.5] * 3


def test_pca_cli_folder_and_official_pth(world, tmp_path, capsys, official_pth):
    images = world / "spair" / "SPair-71k" / "JPEGImages" / "cat"
    models = f"{world / 'tiny'},eupe_vitt16"
    args = ["eval", "pca", "--model", models, "--weights", f",{official_pth['eupe_vitt16']}"]
    code, _, _ = _run([*args, "--data", images, "--output-dir", tmp_path, "resolution=64"], capsys)
    r = _results(tmp_path)
    assert code == 0 and (tmp_path / "pca.png").is_file()
    assert r["extra"]["random_init"] == {"tiny": False, "eupe_vitt16": False}


def test_zeroshot_cli_supported_and_not(world, tmp_path, capsys):
    open_clip = pytest.importorskip("open_clip")
    from eupe.models.heads import TeacherHeads

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "eupe-cli-tiny-clip.json").write_text(json.dumps(cfg))  # a model config file, by path
    open_clip.add_model_config(str(tmp_path / "eupe-cli-tiny-clip.json"))
    torch.manual_seed(0)
    torch.save(open_clip.create_model("eupe-cli-tiny-clip").state_dict(), tmp_path / "clip.pt")
    final = save_tiny_encoder(tmp_path / "final")
    TeacherHeads(192, {"pe_core": (16, 16), "dinov3": (32, 32)}, hidden_dim=24).save(final)
    text = [f"text_model={tmp_path / 'eupe-cli-tiny-clip.json'}", f"text_weights={tmp_path / 'clip.pt'}"]
    common = [*text, "resolution=32", "resize=32", "num_workers=0"]
    args = [
        "eval",
        "zeroshot",
        "--model",
        final,
        "--data",
        world / "imagenet",
        "--output-dir",
        tmp_path / "a",
    ]
    code, _, _ = _run([*args, "teacher=pe_core", *common], capsys)
    r = _results(tmp_path / "a")
    assert code == 0 and r["status"] == "ok" and 0 <= r["value"] <= 1 and r["extra"]["num_classes"] == 3
    assert r["model"] == f"{tmp_path.name}/final"
    args = [
        "eval",
        "zeroshot",
        "--model",
        world / "tiny",
        "--data",
        world / "imagenet",
        "--output-dir",
        tmp_path / "b",
    ]
    code, out, _ = _run([*args, *common], capsys)
    r = _results(tmp_path / "b")
    assert code == 0 and r["value"] is None and r["status"].startswith("not supported: no adapter heads")
    assert "not supported" in out


def test_suite_cli_table_and_radar(world, tmp_path, capsys):
    config = {
        "output_dir": str(tmp_path / "suite"),
        "title": "tiny suite",
        "settings": {"device": "cpu", "num_workers": 0},
        "models": [
            {"name": "tiny-A", "model": str(world / "tiny")},
            {"name": "tiny-B", "model": str(world / "tiny2")},
        ],
        "evals": [
            {
                "task": "knn",
                "data": str(world / "imagenet"),
                "settings": {"resolution": 32, "resize": 32, "num_workers": 0},
            },
            {"task": "zeroshot", "data": str(world / "imagenet"), "settings": {"text_model": "ViT-B-16"}},
            {"task": "spair", "data": str(world / "spair"), "settings": {"resolution": 64}},
            {
                "task": "depth",
                "data": str(world / "nyu"),
                "settings": {"resolution": 32, "iterations": 2, "batch_size": 2},
            },
            {
                "task": "pca",
                "data": str(world / "spair" / "SPair-71k" / "JPEGImages"),
                "settings": {"resolution": 64},
            },
        ],
    }
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps(config))  # JSON is valid YAML
    code, out, _ = _run(["eval", "suite", path], capsys)
    assert code == 0
    table = (tmp_path / "suite" / "table.md").read_text()
    header, _, row_a, row_b = table.splitlines()[2:6]
    assert header.startswith("| Model | IN1k-KNN") and "NYUv2 rmse ↓" in header and "SPair" in header
    assert row_a.startswith("| tiny-A |") and row_b.startswith("| tiny-B |")
    assert "n/a" in row_a and "n/a" in row_b  # no adapter heads: zero-shot not supported
    assert "**100.0**" in row_a and "**100.0**" in row_b  # identical SPair pairs: a tie for best
    assert table.count("**") >= 2 * 4  # every column with numbers has a bold best
    assert (tmp_path / "suite" / "radar.png").stat().st_size > 10_000
    assert (tmp_path / "suite" / "pca" / "pca.png").is_file()
    # a second run reuses every results.json (resume) and gives the same table
    before = (tmp_path / "suite" / "tiny-A" / "NYUv2" / "results.json").stat().st_mtime_ns
    assert _run(["eval", "suite", path], capsys)[0] == 0
    assert (tmp_path / "suite" / "tiny-A" / "NYUv2" / "results.json").stat().st_mtime_ns == before
    assert (tmp_path / "suite" / "table.md").read_text() == table
