"""The demo's pieces on tiny inputs: views, stage configs, report helpers.

The whole pipeline is `eupe demo --quick` (CI); every stage trains through `Distiller`
(tests/test_distill_targets.py covers its precomputed targets and the `views` data source).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eupe.demo.data import make_views
from eupe.demo.pipeline import STAGES, load_demo, stage_config
from eupe.demo.report import claim_check, format_table, headline
from eupe.models import create_model


def _pool(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, size=(n, 48, 48, 3), dtype=np.uint8)


def test_views_are_a_pure_function_of_the_seed_and_a_prefix_for_a_smaller_pool():
    a = make_views(_pool(3), 2, 32, seed=5, progress=False)
    b = make_views(_pool(3)[:2], 2, 32, seed=5, progress=False)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a[:4], b) and not torch.equal(a[0], a[1])
    assert not torch.equal(a, make_views(_pool(3), 2, 32, seed=6, progress=False))


def test_stage_configs_are_distill_configs_of_the_recipe(tmp_path: Path):
    """configs/demo/full.yaml: Stages 1/2/3 and the direct ablation as ordinary distill configs."""
    s, blocks = load_demo()
    proxy = {"proxy": {"backend": "eupe", "checkpoint": str(tmp_path / "stage1/final"), "resolution": 112}}
    experts = {
        "t": {"backend": "timm", "model": "vit_small_patch16_224", "pretrained": False, "resolution": 224}
    }
    init = {"student": {"init": str(tmp_path / "stage2/final")}}  # as run_demo sets it for Stage 3
    views = tmp_path / "views.safetensors"
    cfgs = {
        n: stage_config(
            s,
            blocks[n],
            tmp_path / n,
            views,
            experts if n in ("stage1", "direct") else proxy,
            **(init if n == "stage3" else {}),
        )
        for n in STAGES
    }
    assert {n: c.output_dir for n, c in cfgs.items()} == {n: str(tmp_path / n) for n in STAGES}
    assert cfgs["stage3"].stage == "pyramid" and cfgs["stage3"].pyramid == [112, 176, 224]
    assert cfgs["stage2"].students["student"].resolution == s.proxy_resolution == 112
    for c in cfgs.values():
        (source,) = c.data.sources
        assert (source.type, source.path) == ("views", str(views))
        assert tuple(c.data.augment.crop_scale) == (1.0, 1.0) and c.data.augment.flip_p == 0.0
        assert c.train.threads == s.threads == 1 and c.train.device == "cpu"
    assert cfgs["stage1"].students["student"].name == "eupe_vits16"  # with 6 blocks (overrides)
    assert cfgs["stage1"].students["student"].overrides == {"depth": 6}
    assert cfgs["stage2"].students["student"].mimetic_init


def test_quick_is_the_same_pipeline_on_less():
    (full, fb), (quick, qb) = load_demo(), load_demo(quick=True)
    assert quick.pool_size < full.pool_size and quick.threads == full.threads == 1
    assert all(qb[n]["train"]["max_steps"] < fb[n]["train"]["max_steps"] for n in STAGES)
    assert qb["stage3"]["pyramid"] == fb["stage3"]["pyramid"]
    assert (full.seeds, quick.seeds) == (3, 2) and tuple(full.sweep) == (1, 2, 4)


def test_report_table_bolds_the_best_and_checks_the_goals():
    row = {"knn": 0.5, "text_iou": 0.5, "pck": 0.5, "pck_warps": 0.5, "pck_graf": 0.5}
    models = {
        "teacher_effnet": {**row, "knn": 0.8},
        "teacher_ocr": {**row, "text_iou": 0.7},
        "proxy": row,
        "eupe_vitp16": {**row, "knn": 0.75, "pck": 0.6, "text_iou": 0.4},
        "direct_vitp16": row,
    }
    spread = {"eupe_vitp16": {**dict.fromkeys(row, 0.0), "knn": 0.02}}
    table = format_table(models, spread)
    assert "| teacher_effnet | **0.800** |" in table and "| teacher_ocr | 0.500 | **0.700** |" in table
    assert "| eupe_vitp16 | 0.750 +- 0.020 |" in table
    sides = {
        "teacher_effnet": 224,
        "teacher_ocr": 256,
        "proxy": 112,
        "eupe_vitp16": 224,
        "direct_vitp16": 112,
    }
    assert "| proxy | 112 | 0.500 |" in format_table(models, spread, sides)
    lines = claim_check(models, "vitp16")
    assert ">= 60%: yes" in lines[0] and ">= 60%: no" in lines[1]  # 0.4 / 0.7 = 57%
    mean_line = next(x for x in lines if x.startswith("- EUPE route >= direct on the mean"))
    assert "deviation (0.000): yes" in mean_line and "better on 2/3" in mean_line
    # the EUPE lead on the mean (0.583 vs 0.500) within one seed standard deviation is no win
    spread_line = next(x for x in claim_check(models, "vitp16", {"eupe_vitp16": 0.1}) if "on the mean" in x)
    assert "deviation (0.100): no" in spread_line
    assert lines[-1] == "- The proxy above the direct student on at least two benchmarks: no (none)"
    spreads = {n: dict.fromkeys(row, 0.01) for n in models}
    first = headline(models, spreads, "vitp16")[0]
    assert first == "- k-NN: EUPE route 0.750 +- 0.010 vs direct 0.500 +- 0.010 (EUPE ahead by 0.250)."


def test_fit_summary_reads_the_last_steps_of_each_stage(tmp_path: Path):
    from eupe.demo.report import fit_summary

    (tmp_path / "stage2").mkdir()
    (tmp_path / "empty").mkdir()
    rows = [
        {"step": i, "loss/proxy/cls_cos": 1.0 - i / 20, "loss/proxy/patch_cos": 0.5} for i in range(1, 21)
    ]
    (tmp_path / "stage2" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (line,) = fit_summary({"stage2": tmp_path / "stage2", "none": tmp_path / "empty"}, last=2)
    assert line == "- stage2 (20 steps): proxy/cls_cos 0.025, proxy/patch_cos 0.500"


def test_heldout_cosine_scores_the_heads_against_normalized_targets():
    from eupe.demo.report import heldout_cosine
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
