"""The evaluation registry: one decorated function makes a CLI command, a help line and a suite column."""

from __future__ import annotations

import json
from dataclasses import dataclass, is_dataclass

import pytest

from eupe.cli import main
from eupe.errors import ConfigError
from eupe.eval import TASKS, EvalResult, register_task, run_task
from eupe.eval.common import parse_overrides, resolve_settings, settings_dict


@dataclass
class ToySettings:
    scale: float = 1.0
    device: str = "auto"


def toy(model, data, weights=None, output_dir=None, **overrides) -> EvalResult:
    s = resolve_settings(ToySettings, overrides)
    result = EvalResult("toy", "score", 0.5 * s.scale, str(model), str(data), settings_dict(s))
    if output_dir is not None:
        result.write(output_dir)
    return result


@pytest.fixture
def toy_task():
    register_task("toy", settings=ToySettings, label="Toy", help="a toy evaluation", example="scale=2")(toy)
    yield TASKS["toy"]
    del TASKS["toy"]


def test_the_builtin_tasks_in_help_order():
    assert list(TASKS) == ["knn", "zeroshot", "seg", "depth", "spair", "pca"]
    labels = {name: spec.label for name, spec in TASKS.items()}
    assert labels["knn"] == "IN1k-KNN" and labels["depth"] == "NYUv2"  # the suite's column names
    assert [name for name, spec in TASKS.items() if spec.multi_model] == ["pca"]
    for spec in TASKS.values():
        assert is_dataclass(spec.settings) and spec.help and callable(spec.run)
        # the help's example only uses settings the task has
        assert set(parse_overrides(spec.example.split())) <= spec.setting_names(), spec.name
    assert "protocol" in TASKS["knn"].example


def test_a_name_registers_once(toy_task):
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_task("toy", settings=ToySettings, label="Toy", help="again")(toy)


def test_unknown_task_names_the_choices():
    with pytest.raises(ConfigError, match="unknown evaluation 'nope'; choose from knn, zeroshot"):
        run_task("nope", model="m", data="d")


def test_a_registered_task_is_a_command_with_help(toy_task, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "evaluate frozen encoders: knn, zeroshot, seg, depth, spair, pca, toy, or a whole suite" in out
    assert "a toy evaluation" in out
    with pytest.raises(SystemExit):
        main(["eval", "toy", "--help"])
    assert "--output-dir out/toy scale=2" in capsys.readouterr().out

    assert (
        main(["eval", "toy", "--model", "m", "--data", "d", "--output-dir", str(tmp_path / "a"), "scale=3"])
        == 0
    )
    assert json.loads((tmp_path / "a" / "results.json").read_text())["value"] == 1.5
    assert "toy m on d: score = 150.00%" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "toy", "--model", "runs/x/final", "--data", "d"]) == 0  # default output dir
    assert (tmp_path / "eval_toy_final" / "results.json").is_file()
    assert main(["eval", "toy", "--model", "m", "--data", "d", "scale=x"]) == 2
    assert "bad setting scale for ToySettings" in capsys.readouterr().err


def test_a_registered_task_is_a_suite_column(toy_task, tmp_path, capsys):
    config = {
        "output_dir": str(tmp_path / "suite"),
        "settings": {"device": "cpu", "num_workers": 0},  # num_workers: not a toy setting, left out
        "models": [{"name": "A", "model": "a"}, {"name": "B", "model": "b"}],
        "evals": [
            {"task": "toy", "data": "d"},
            {"task": "toy", "data": "d", "label": "Toy x4", "settings": {"scale": 4}},
        ],
    }
    (tmp_path / "suite.yaml").write_text(json.dumps(config))
    assert main(["eval", "suite", str(tmp_path / "suite.yaml")]) == 0
    table = (tmp_path / "suite" / "table.md").read_text()
    assert "| Model | Toy score ↑ | Toy x4 score ↑ |" in table and "| A | **50.0** | **200.0** |" in table
    assert json.loads((tmp_path / "suite" / "B" / "Toy" / "results.json").read_text())["settings"] == {
        "scale": 1.0,
        "device": "cpu",
    }
