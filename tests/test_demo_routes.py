"""The demo's runs: sizes of its tiers, seeds (offsets, mean and spread), claims, and the sweep's
plumbing on made-up records (the whole sweep runs in CI: `eupe demo --quick --sweep`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eupe.demo.pipeline import STAGES, DemoSettings, load_demo, student_label
from eupe.demo.routes import ROUTES, SEED_STRIDE, Run, claim, mean_and_spread, plan_runs, stage_block
from eupe.demo.studies import sweep_results, sweep_table
from eupe.models import count_params, create_model


def test_the_demo_tiers_keep_the_papers_proportions():
    """Experts (EfficientNet-Lite0 4.7M, PP-OCRv4 det 1.2M) are 4.7-19x the student; the proxy is at
    least as large as the largest expert."""
    timm = pytest.importorskip("timm")
    _, blocks = load_demo()
    students = {n: blocks[n]["student"] for n in STAGES}
    assert {students[n]["name"] for n in ("stage2", "stage3", "direct")} == {"eupe_vitp16"}
    student = count_params(create_model("eupe_vitp16"))
    proxy = count_params(create_model(students["stage1"]["name"], **students["stage1"].get("overrides", {})))
    effnet = sum(p.numel() for p in timm.create_model("tf_efficientnet_lite0", pretrained=False).parameters())
    ocr = 1_171_841  # PP-OCRv4 det's weights (its ONNX constants; tests/test_demo_experts.py loads the file)
    assert student == 250_176 and student_label(blocks) == "vitp16"
    assert proxy >= max(effnet, ocr)  # the proxy is at least as large as the largest expert
    assert min(effnet, ocr) / student > 4.5 and effnet / student > 18 and proxy / student > 20


def test_seed_k_moves_every_stage_seed_and_a_budget_scales_the_steps():
    _, blocks = load_demo()
    for stage in ("stage2", "stage3", "direct"):
        base = blocks[stage]
        b = stage_block(blocks, stage, Run("eupe", seed=2, budget=4))
        assert b["seed"] == base["seed"] + 2 * SEED_STRIDE
        assert b["train"]["max_steps"] == 4 * base["train"]["max_steps"]
        assert blocks[stage]["train"]["max_steps"] == base["train"]["max_steps"]  # not modified in place
    steps = {n: blocks[n]["train"]["max_steps"] for n in STAGES}
    # the two routes get exactly the same student steps (paper Table 2's comparison)
    assert steps["direct"] == steps["stage2"] + steps["stage3"]


def test_plan_runs_covers_both_routes_for_every_seed_and_budget():
    runs = plan_runs(3)
    assert [(r.route, r.seed, r.folder) for r in runs[:2]] == [("eupe", 0, "seed_0"), ("direct", 0, "seed_0")]
    assert len(runs) == 3 * len(ROUTES) and {r.budget for r in runs} == {1}
    sweep = plan_runs(1, [1, 2, 4])
    assert [r.folder for r in sweep if r.route == "direct"] == [f"sweep/x{b}/seed_0" for b in (1, 2, 4)]
    assert Run("eupe", 0).stages == ("stage2", "stage3") and Run("direct", 0).stages == ("direct",)


def test_mean_and_spread_are_the_sample_statistics_over_seeds():
    mean, spread = mean_and_spread([{"knn": 0.2}, {"knn": 0.4}, {"knn": 0.3}])
    assert mean["knn"] == pytest.approx(0.3) and spread["knn"] == pytest.approx(0.1)  # ddof=1
    assert mean_and_spread([{"knn": 0.5}]) == ({"knn": 0.5}, {"knn": 0.0})


def test_a_run_is_claimed_by_one_process_only(tmp_path: Path):
    run = Run("eupe", 1, 1, "seed_1")
    assert claim(run, tmp_path) and not claim(run, tmp_path)
    assert claim(Run("direct", 1, 1, "seed_1"), tmp_path)


def test_finish_sweep_aggregates_budgets_and_routes_into_json_table_and_plot(tmp_path: Path):
    _, blocks = load_demo(quick=True)
    s = DemoSettings(sweep=(1, 2))
    runs = plan_runs(2, list(s.sweep), ["1_2"])
    assert [r.folder for r in runs if r.proxy] == ["sweep/proxy_1_2/seed_0", "sweep/proxy_1_2/seed_1"]
    per_run = {}
    for r in runs:  # made-up scores: the EUPE route gains more from budget, less from a half-trained proxy
        base = 0.2 + 0.05 * r.budget * (2 if r.route == "eupe" else 1) + 0.01 * r.seed - 0.1 * bool(r.proxy)
        scores = {"knn": base, "text_iou": base / 2, "pck": base + 0.1, "pck_warps": base, "pck_graf": base}
        per_run[r] = {"cpu_s": 10.0 * r.budget, "scores": scores}
    row = {"knn": 0.7, "text_iou": 0.6, "pck": 0.5, "pck_warps": 0.5, "pck_graf": 0.5}
    half = {**row, "knn": 0.3}
    proxy = {
        "scores": row,
        "budgets": {"1_2": half},
        "record": {"source": "trained"},
        "steps": {"1_2": 8, "1": 16},
    }
    sweep = sweep_results(
        tmp_path, list(s.sweep), blocks, runs, per_run, {"teacher_a": row}, proxy, {}, 0.0, {"cpu": "x"}
    )
    steps = blocks["stage2"]["train"]["max_steps"] + blocks["stage3"]["train"]["max_steps"]
    assert sweep["student_steps"] == {"1": steps, "2": 2 * steps} and sweep["seeds"] == [0, 1]
    eupe2 = sweep["routes"]["eupe"]["2"]
    assert eupe2["mean"]["knn"] == pytest.approx(0.405) and eupe2["spread"]["knn"] == pytest.approx(
        0.00707, abs=1e-4
    )
    assert eupe2["cpu_s"] == 20.0
    assert json.loads((tmp_path / "sweep.json").read_text())["budgets"] == [1, 2]
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    table = sweep_table(sweep)
    assert f"| 2x | {2 * steps} | eupe | 0.405 +- 0.007 |" in table
    assert "sweep.png" in (tmp_path / "sweep.md").read_text()
    # the proxy's own budget: the EUPE runs from each checkpoint, and the finished proxy's 1x runs
    budgets = sweep["proxy_budgets"]
    assert list(budgets) == ["1_2", "1"] and budgets["1_2"]["proxy_steps"] == 8
    assert budgets["1_2"]["mean"]["knn"] == pytest.approx(0.205) and budgets["1"]["mean"][
        "knn"
    ] == pytest.approx(0.305)
    assert budgets["1_2"]["proxy_scores"]["knn"] == 0.3 and budgets["1"]["proxy_scores"]["knn"] == 0.7
    md = (tmp_path / "sweep.md").read_text()
    assert "| 1/2 | 8 | 0.300 / 0.600 / 0.500 | 0.205 +- 0.007 |" in md
    assert (tmp_path / "sweep_proxy.png").stat().st_size > 10_000


def test_search_gives_both_routes_the_same_grid_and_picks_each_routes_best(tmp_path: Path):
    from eupe.demo.routes import plan_search
    from eupe.demo.studies import search_results

    _, blocks = load_demo(quick=True)
    runs = plan_search([1e-3, 2e-3], [128, 256])
    assert len(runs) == 8 and {(r.lr, r.head) for r in runs if r.route == "direct"} == {
        (r.lr, r.head) for r in runs if r.route == "eupe"
    }
    base = blocks["stage2"]["train"]
    block = stage_block(blocks, "stage2", runs[0])  # the lr moves the cosine floor with it
    assert (block["train"]["lr"], block["heads"]["hidden_dim"]) == (1e-3, 128)
    assert block["train"]["min_lr"] == pytest.approx(base["min_lr"] * 1e-3 / base["lr"])
    per_run = {}
    for r in runs:  # made-up: the direct route likes the high lr, the EUPE route the low one
        good = (r.lr == 2e-3) == (r.route == "direct")
        v = 0.3 + 0.1 * good + 0.01 * (r.head == 256)
        per_run[r] = {
            "cpu_s": 5.0,
            "scores": {"knn": v, "text_iou": v, "pck": v, "pck_warps": v, "pck_graf": v},
        }
    search = search_results(tmp_path, runs, per_run, blocks, {"source": "shipped"}, {}, 0.0, {})
    assert search["routes"]["direct"]["chosen"] == {"lr": 2e-3, "head": 256}
    assert search["routes"]["eupe"]["chosen"] == {"lr": 1e-3, "head": 256}
    md = (tmp_path / "search.md").read_text()
    assert "| direct | 0.002 | 256 | **0.410** |" in md and "never the benchmark sets" in md


def test_validation_sets_share_nothing_with_the_benchmarks():
    from eupe.demo.assets import make_splits
    from eupe.demo.pipeline import validation_splits

    splits = make_splits(0)
    val = validation_splits(splits)
    assert val.knn_stamps and not {a.file for a in val.knn_stamps} & {a.file for a in splits.knn_stamps}
    assert {a.label for a in val.knn_stamps} <= set(splits.knn_classes)
    assert val.heldout_photos and not {a.file for a in val.heldout_photos} & {
        a.file for a in splits.heldout_photos
    }
    assert not any(a.has_text for a in val.heldout_photos)
