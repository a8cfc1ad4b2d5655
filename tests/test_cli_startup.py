"""The front door is instant: `eupe --help` and every `eupe COMMAND --help` import neither torch nor
timm, and the help's table of evaluations is the registry's; a missing optional package is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eupe.cli import EVAL_TASKS, build_parser, missing_package

HEAVY = ("torch", "timm", "numpy", "torchvision", "transformers")
GUARD = Path(__file__).parent / "extras_guard"


def _subcommands(parser, prefix=()):
    import argparse

    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*prefix, name))


def test_help_of_every_command_imports_no_torch():
    commands = [list(c) for c in _subcommands(build_parser())]
    assert ["eval", "knn"] in commands and ["vlm", "train"] in commands and ["data", "index"] in commands
    script = (
        "import json, sys\nfrom eupe.cli import main\nfor argv in json.loads(sys.argv[1]):\n"
        "    try:\n        main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True, check=True
    )
    assert "evaluate frozen encoders: knn, zeroshot, seg, depth, spair, pca" in run.stdout
    assert json.loads(run.stderr.strip().splitlines()[-1]) == []


def test_import_eupe_is_lazy():
    script = (
        "import sys, eupe\nprint(sorted(m for m in sys.modules if m.partition('.')[0] in ('torch', 'timm')))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import eupe  # the public names still resolve (here, where torch is loaded already)

    assert eupe.create_model.__module__ == "eupe.models.loading"
    assert {"create_model", "Encoder", "EupeError"} <= set(dir(eupe))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        eupe.nope  # noqa: B018


def test_the_help_table_is_the_registry():
    from eupe.eval import TASKS

    builtin = {name: spec for name, spec in TASKS.items() if spec.run.__module__.startswith("eupe.eval.")}
    assert list(EVAL_TASKS) == list(builtin)
    for name, shown in EVAL_TASKS.items():
        spec = builtin[name]
        assert (shown.help, shown.example, shown.multi_model) == (spec.help, spec.example, spec.multi_model)


def test_missing_package_names_the_extra_of_the_command():
    assert missing_package("onnx", "demo").endswith("pip install 'eupe[demo]'")
    assert missing_package("onnx.helper", "export").endswith("pip install 'eupe[export]'")
    assert missing_package("open_clip", "eval").endswith("pip install 'eupe[eval]'")
    assert missing_package("lmms_eval", "distill").endswith("pip install 'eupe[vlm]'")
    assert (
        missing_package("tensorboard", "distill")
        == "the package 'tensorboard' is not installed (pip install tensorboard)"
    )


def test_a_command_without_its_extra_fails_in_one_line(tmp_path):
    """The demo with the core alone (the import guard hides every other package) says what to install."""
    pytest.importorskip("packaging")
    env = {**os.environ, "PYTHONPATH": str(GUARD), "EUPE_ONLY_EXTRAS": ""}
    run = subprocess.run(
        [sys.executable, "-m", "eupe", "demo", "--quick", "--output-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith("needs the demo extra: pip install 'eupe[demo]'")
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").rglob("*.safetensors"))


def test_the_guard_hides_what_an_extra_does_not_install():
    sys.path.insert(0, str(GUARD))
    try:
        from only_extras import blocked_modules, installed_by
    finally:
        sys.path.remove(str(GUARD))
    core, demo = installed_by([]), installed_by(["demo"])
    assert {"torch", "timm", "omegaconf", "safetensors"} <= core and "onnxruntime" not in core
    assert {"onnx", "onnxruntime", "rapidocr-onnxruntime"} <= demo - core
    blocked = blocked_modules(["demo"])
    assert "onnxruntime" not in blocked and "torch" not in blocked
    for name in ("open_clip", "lmms_eval", "executorch"):  # installed here, but by other extras
        if name in sys.modules or _importable(name):
            assert name in blocked


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
