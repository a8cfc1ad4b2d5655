"""The demo's precomputed-target training (train.py) and report helpers, on tiny inputs.

The whole pipeline is `eupe demo --quick` (CI); here: views, targets, a few student steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eupe.demo.bench import encoder_featurizer
from eupe.demo.pipeline import DemoSettings, claim_check, format_table, quick_settings
from eupe.demo.train import OnlineTeacher, StageSettings, make_views, teacher_targets, train_student
from eupe.models import create_model
from eupe.models.encoder import feature_map_to_output


def _pool(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, size=(n, 48, 48, 3), dtype=np.uint8)


def test_views_are_a_pure_function_of_the_seed_and_a_prefix_for_a_smaller_pool():
    a = make_views(_pool(3), 2, 32, seed=5, progress=False)
    b = make_views(_pool(3)[:2], 2, 32, seed=5, progress=False)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a[:4], b) and not torch.equal(a[0], a[1])
    assert not torch.equal(a, make_views(_pool(3), 2, 32, seed=6, progress=False))


def _teacher(x: torch.Tensor):
    """A fixed 'teacher': 8x8 average-pooled pixels and a constant channel that must not explode."""
    fmap = torch.cat([F.avg_pool2d(x, 8), torch.zeros_like(x[:, :1, ::8, ::8])], dim=1)
    return feature_map_to_output(fmap * 4 + 1)


def test_targets_are_standardized_over_all_views():
    views = make_views(_pool(4), 3, 32, seed=0, progress=False)
    targets, norm = teacher_targets({"t": _teacher}, views, batch=5)
    t = targets["t"]
    assert t.cls.shape == (12, 4) and t.patches.shape == (12, 16, 4) and t.grid == (4, 4)
    live = t.patches.float()[..., :3].reshape(-1, 3)
    assert torch.allclose(live.mean(0), torch.zeros(3), atol=2e-3)
    assert torch.allclose(live.std(0), torch.ones(3), atol=2e-2)
    assert t.patches.float().abs().max() < 100 and bool(norm.frozen)


def test_train_student_learns_saves_and_repeats_bit_identically(tmp_path: Path):
    views = make_views(_pool(4), 2, 32, seed=0, progress=False)
    targets, _ = teacher_targets({"t": _teacher}, views)
    s = StageSettings(steps=4, batch=4, lr=1e-3, warmup=1, resolutions=(32, 48), head_dim=16)
    weights = []
    for run in ("a", "b"):
        torch.manual_seed(0)
        model = create_model("eupe_vitt16")
        train_student(model, views, targets, s, seed=1, out_dir=tmp_path / run, desc=run)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert {r["resolution"] for r in rows} <= {32, 48}
    loaded = create_model(str(tmp_path / "a" / "final"))
    assert (tmp_path / "a" / "final" / "heads.safetensors").is_file()
    assert torch.equal(torch.cat([p.detach().flatten() for p in loaded.parameters()]), weights[0])


def test_stage3_teacher_draws_its_own_scale_and_is_normalized_like_stage2(tmp_path: Path):
    """Paper 3.3: the student and the (frozen, online) teacher pick pyramid scales independently."""
    views = make_views(_pool(4), 2, 32, seed=0, progress=False)
    torch.manual_seed(3)
    proxy = create_model("eupe_vitt16")
    targets, norm = teacher_targets({"proxy": encoder_featurizer(proxy, 32)}, views)
    online = OnlineTeacher(proxy, norm, "proxy", (32, 48))
    assert online.dims == targets["proxy"].dims == (192, 192)
    idx = torch.tensor([1, 3])
    y = online.batch(views, idx, 32)  # at the Stage-2 side it reproduces the precomputed targets
    assert torch.allclose(y.cls, targets["proxy"].cls[idx], atol=1e-5)
    assert torch.allclose(y.patches, targets["proxy"].patches[idx].float(), atol=2e-2)
    assert online.batch(views, idx, 48).grid == (3, 3)
    s = StageSettings(steps=8, batch=2, lr=1e-3, warmup=0, resolutions=(32, 48), head_dim=16)
    student = create_model("eupe_vitt16")
    train_student(student, views, {"proxy": online}, s, seed=1, out_dir=tmp_path, desc="s3")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    pairs = {(r["resolution"], r["teacher_resolution/proxy"]) for r in rows}
    assert {r for r, _ in pairs} == {32, 48} and {t for _, t in pairs} == {32, 48}
    assert any(a != b for a, b in pairs)  # drawn independently, not tied to the student's side


def test_report_table_bolds_the_best_and_checks_the_claim():
    row = {"knn": 0.5, "text_iou": 0.5, "pck": 0.5, "pck_warps": 0.5, "pck_graf": 0.5}
    models = {
        "teacher_effnet": {**row, "knn": 0.8},
        "teacher_ocr": {**row, "text_iou": 0.7},
        "proxy": row,
        "eupe_vitt16": {**row, "knn": 0.75, "pck": 0.6},
        "direct_vitt16": row,
    }
    table = format_table(models)
    assert "| teacher_effnet | **0.800** |" in table and "| teacher_ocr | 0.500 | **0.700** |" in table
    lines = claim_check(models)
    assert "within 10%: yes" in lines[0] and "within 10%: no" in lines[1]
    assert "better on 2/3" in lines[-1]


def test_quick_is_the_same_pipeline_on_less():
    full, quick = DemoSettings(), quick_settings()
    assert quick.pool_size < full.pool_size and sum(quick.steps) < sum(full.steps)
    assert quick.threads == full.threads == 1 and quick.pyramid == full.pyramid


def test_fit_summary_reads_the_last_steps_of_each_stage(tmp_path: Path):
    from eupe.demo.pipeline import fit_summary

    (tmp_path / "stage2").mkdir()
    rows = [
        {"step": i, "loss/proxy/cls_cos": 1.0 - i / 20, "loss/proxy/patch_cos": 0.5} for i in range(1, 21)
    ]
    (tmp_path / "stage2" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (line,) = fit_summary(tmp_path, last=2)
    assert line == "- stage2 (20 steps): proxy/cls_cos 0.025, proxy/patch_cos 0.500"


def test_heldout_cosine_scores_the_heads_against_normalized_targets():
    from eupe.demo.train import heldout_cosine
    from eupe.models.encoder import EncoderOutput
    from eupe.models.heads import TeacherHeads

    torch.manual_seed(0)
    student = create_model("eupe_vitt16").eval()
    heads = TeacherHeads(192, {"t": (6, 5)}, 16).eval()
    with torch.no_grad():
        out = student(torch.randn(3, 3, 32, 32))
        z_cls, z_patch = heads(out, ["t"])["t"]
    exact = EncoderOutput(z_cls, z_patch, None, tuple(out.grid))
    assert heldout_cosine(out, heads, exact, "t") == pytest.approx({"cls_cos_sim": 1.0, "patch_cos_sim": 1.0})
    flipped = EncoderOutput(-z_cls, -z_patch, None, tuple(out.grid))
    assert heldout_cosine(out, heads, flipped, "t")["cls_cos_sim"] == pytest.approx(-1.0)
    # a target on a coarser grid is compared after the loss's own grid matching
    coarse = EncoderOutput(z_cls, torch.randn(3, 1, 5), None, (1, 1))
    assert -1.0 <= heldout_cosine(out, heads, coarse, "t")["patch_cos_sim"] <= 1.0
