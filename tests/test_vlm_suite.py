"""`eupe eval suite` shows the VLM columns (from `eupe vlm eval` results) beside the encoder columns."""

from __future__ import annotations

import json
from pathlib import Path

from eupe.eval.common import EvalResult
from eupe.eval.report import load_suite_config, run_suite

PAPER = {  # (task, metric, label)
    "textvqa_val": ("vqa_accuracy", "TextVQA"),
    "scienceqa_img": ("accuracy", "SQA"),
    "realworldqa": ("accuracy", "Realworld"),
    "pope": ("f1", "POPE"),
    "gqa": ("accuracy", "GQA"),
    "mme": ("mme_perception", "MMEp"),
}


def _results(folder: Path, values: dict[str, float]) -> Path:
    folder.mkdir(parents=True)
    entries = {
        task: EvalResult(
            task, metric, values[task], "llava", "lmms-lab", {}, extra={"label": label}
        ).to_dict()
        for task, (metric, label) in PAPER.items()
    }
    (folder / "results.json").write_text(json.dumps(entries))
    return folder


def test_suite_adds_vlm_columns_and_radar(tmp_path):
    a = _results(tmp_path / "a", {**dict.fromkeys(PAPER, 0.5), "mme": 1400.0})
    b = _results(tmp_path / "b", {**dict.fromkeys(PAPER, 0.6), "mme": 1300.0})
    cfg = tmp_path / "suite.yaml"
    cfg.write_text(
        f"output_dir: {tmp_path / 'out'}\n"
        "models:\n"
        f"  - {{name: A, model: eupe_vitt16, vlm: {a}}}\n"
        f"  - {{name: B, model: eupe_vitt16, vlm: {b}}}\n"
        "evals: []\n"
    )
    summary = run_suite(load_suite_config(cfg))
    table = Path(summary["table"]).read_text()
    header = table.splitlines()[2]
    for label in ("TextVQA", "SQA", "Realworld", "POPE", "GQA", "MMEp"):
        assert label in header
    row_a = next(line for line in table.splitlines() if line.startswith("| A "))
    row_b = next(line for line in table.splitlines() if line.startswith("| B "))
    assert "**1400**" in row_a and "| 50.0 |" in row_a  # MME in points, the rest in %
    assert "**60.0**" in row_b and "| 1300 |" in row_b
    assert Path(summary["radar"]).is_file()
    assert summary["results"]["A"]["MMEp"]["value"] == 1400.0
