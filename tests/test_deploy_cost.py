"""The cost table: official parameter counts, plausible FLOPs (checked against an analytic count),
meta-device FLOPs for the proxy and timm teachers, a measured latency, and the CLI's files."""

from __future__ import annotations

import json

import pytest

from eupe.cli import main
from eupe.deploy.cost import FLOP_CONVENTION, cost_table, to_markdown
from eupe.errors import EupeError
from eupe.models import ZOO


@pytest.fixture(scope="module")
def students() -> dict:
    table = cost_table(["eupe_vitt16", "eupe_vits16", "eupe_convnext_tiny"], sizes=[256, 512], runtimes=[])
    return {row["model"]: row for row in table["rows"]}


def test_official_param_counts(students):
    assert students["eupe_vitt16"]["params"] == 5_492_160
    assert students["eupe_vits16"]["params"] == 21_601_152
    assert students["eupe_convnext_tiny"]["params"] == 27_820_128
    for name, row in students.items():
        assert row["params"] == ZOO[name].official_params


@pytest.mark.parametrize("name,depth,dim", [("eupe_vitt16", 12, 192), ("eupe_vits16", 12, 384)])
def test_vit_flops_match_analytic_count(students, name, depth, dim):
    """2 FLOPs per weight per token (linear layers) + 4*N^2*D per block (QK^T and AV)."""
    row = students[name]
    for size in (256, 512):
        patches = (size // 16) ** 2
        tokens = patches + 1 + 4
        block_weights = depth * 12 * dim * dim  # qkv 3D^2 + proj D^2 + MLP 8D^2
        analytic = 2 * block_weights * tokens + depth * 4 * tokens**2 * dim + 2 * 3 * 16 * 16 * dim * patches
        assert row["gflops"][size] * 1e9 == pytest.approx(analytic, rel=0.02)
        assert row["grid"][size] == [size // 16, size // 16]
    # 4x the tokens: 4x for the linear layers, up to 16x for the quadratic attention term.
    assert 4.0 < row["gflops"][512] / row["gflops"][256] < 16.0


def test_convnext_flops_scale_with_pixels(students):
    row = students["eupe_convnext_tiny"]
    assert row["gflops"][512] / row["gflops"][256] == pytest.approx(4.0, rel=0.01)
    # Published ConvNeXt-T: 4.5 GMACs at 224 -> ~9 GFLOPs; at 256 that is ~(256/224)^2 more.
    assert row["gflops"][256] == pytest.approx(2 * 4.47 * (256 / 224) ** 2, rel=0.05)


def test_proxy_and_timm_teacher_are_flops_only_on_meta():
    table = cost_table(
        ["eupe_proxy_g16", "vit_pe_core_tiny_patch16_384"], sizes=[256], runtimes=["eager"], runs=1, warmup=0
    )
    proxy, timm_row = table["rows"]
    assert 1.8e9 < proxy["params"] < 2.0e9 and proxy["gflops"][256] > 500
    assert proxy["latency_ms"] == {} and "meta device only" in proxy["notes"][0]
    assert timm_row["kind"] == "timm" and timm_row["gflops"][256] > 0
    assert timm_row["latency_ms"]["eager"][256] > 0


def test_eager_latency_and_markdown():
    table = cost_table(["eupe_vitt16"], sizes=[64], runtimes=["eager"], runs=2, warmup=1, threads=1)
    row = table["rows"][0]
    assert row["latency_ms"]["eager"][64] > 0 and 0 < row["cpu_ms"]["eager"][64]
    md = to_markdown(table)
    assert FLOP_CONVENTION in md and "1 thread(s)" in md and "| eupe_vitt16 | 5.49 |" in md


def test_unknown_model_and_runtime():
    with pytest.raises(EupeError, match="unknown model 'not_a_model'"):
        cost_table(["not_a_model"], sizes=[256], runtimes=[])
    with pytest.raises(EupeError, match="unknown runtime"):
        cost_table(["eupe_vitt16"], sizes=[256], runtimes=["tensorrt"])


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    rc = main(
        ["cost", "eupe_vitt16", "--sizes", "64", "--runs", "1", "--warmup", "0", "--threads", "1"]
        + ["--json", str(tmp_path / "t.json"), "--output-dir", str(tmp_path / "out")]
    )
    assert rc == 0
    table = json.loads((tmp_path / "t.json").read_text())
    assert table["rows"][0]["params"] == 5_492_160 and table["header"]["threads"] == 1
    assert (tmp_path / "out" / "cost.md").read_text().startswith("GFLOPs per image")
    assert "| eupe_vitt16 |" in capsys.readouterr().out
