"""docs/fidelity.md names config keys; every one of them must exist.

A backticked `section.key` (optionally followed by `: value` or `=value`) counts as a key when its
first part is a section of the distillation config (`train`, `teachers`, `data`, ...) or an eval
task (`seg`, `depth`, `knn`, ...). `<name>` stands for any teacher/student name.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from eupe.distill.config import DistillConfig
from eupe.eval import TASKS

DOC = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"
KEY = re.compile(r"`([a-z_][a-z0-9_]*(?:\.(?:[a-z0-9_]+|<[a-z_]+>))+)(?:\s*[:=][^`]*)?`")
FILE_SUFFIXES = (".py", ".yaml", ".md", ".json", ".safetensors", ".txt", ".pth", ".png")
DISTILL_SECTIONS = {f.name for f in dataclasses.fields(DistillConfig)}


def doc_keys() -> list[str]:
    keys = {m.group(1) for m in KEY.finditer(DOC.read_text())}
    return sorted(
        k for k in keys if k.split(".")[0] in DISTILL_SECTIONS | set(TASKS) and not k.endswith(FILE_SUFFIXES)
    )


def resolves(cls: type, parts: list[str]) -> bool:
    """Whether `parts` walk from dataclass `cls` through fields, dict values (any key) and lists."""
    tp: typing.Any = cls
    for part in parts:
        origin = typing.get_origin(tp)
        if origin is dict:
            tp = typing.get_args(tp)[1]  # any key: a teacher or student name
            continue
        if not dataclasses.is_dataclass(tp):
            return False
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return False
        tp = hints[part]
    return True


def test_the_doc_names_keys():
    keys = doc_keys()
    # the page documents these by name (issue 13)
    for key in (
        "train.lr_scaling",
        "train.lr_reference_batch",
        "train.compile",
        "norm.batches",
        "teachers.<name>.dtype",
        "distill.smooth_l1_beta",
        "train.betas",
        "train.min_lr",
        "knn.protocol",
        "zeroshot.templates",
        "data.augment.crop_scale",
    ):
        assert key in keys, key
    assert len(keys) > 40
    # the resolver itself: dict values take any name, unknown fields fail
    assert resolves(DistillConfig, ["teachers", "any_name", "patch_weight"])
    assert not resolves(DistillConfig, ["train", "no_such_key"])
    assert not resolves(DistillConfig, ["train", "lr", "deeper"])


@pytest.mark.parametrize("key", doc_keys())
def test_every_key_in_the_doc_exists(key):
    section, *rest = key.split(".")
    if section in TASKS:
        names = TASKS[section].setting_names()
        assert len(rest) == 1 and rest[0] in names, f"{key}: `eupe eval {section}` has no setting {rest}"
    else:
        assert resolves(DistillConfig, [section, *rest]), f"{key}: not a key of DistillConfig"
