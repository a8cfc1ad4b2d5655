"""The evaluation registry: one decorator per benchmark, read by the CLI, the suite and the report.

A benchmark is one module: a settings dataclass and an entry function
`fn(model, data, weights=None, output_dir=None, **settings) -> EvalResult`, decorated with
`@register_task(name, settings=..., label=..., help=...)`. `eupe eval NAME`, its `--help` line, the
suite's column label and the check of a suite's per-task settings all come from that one place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError
from .common import EvalResult

TaskFn = Callable[..., EvalResult]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    run: TaskFn
    settings: type  # the dataclass behind the task's `key=value` settings
    label: str  # the benchmark as the paper's tables name it (the suite's column, e.g. IN1k-KNN)
    help: str  # one line for `eupe eval --help`
    example: str = ""  # `key=value` settings shown in `eupe eval NAME --help`
    # several models in one run (one side-by-side picture): `model` and `weights` are lists
    multi_model: bool = False

    def setting_names(self) -> set[str]:
        return {f.name for f in fields(self.settings)}


# in registration order: the order of `eupe eval --help` (see eupe/eval/__init__.py)
TASKS: dict[str, TaskSpec] = {}


def register_task(
    name: str,
    *,
    settings: type,
    label: str,
    help: str,
    example: str = "",
    multi_model: bool = False,
) -> Callable[[TaskFn], TaskFn]:
    """Register an evaluation's entry function under `name` (the `eupe eval NAME` subcommand)."""

    def wrap(fn: TaskFn) -> TaskFn:
        if name in TASKS:
            raise ValueError(f"evaluation '{name}' is already registered (by {TASKS[name].run.__module__})")
        TASKS[name] = TaskSpec(name, fn, settings, label, help, example, multi_model)
        return fn

    return wrap


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ConfigError(f"unknown evaluation '{name}'; choose from {', '.join(TASKS)}")
    return TASKS[name]


def run_task(
    name: str,
    *,
    model: Any,
    data: str | os.PathLike,
    weights: Any = None,
    output_dir: str | os.PathLike | None = None,
    settings: dict[str, Any] | None = None,
) -> EvalResult:
    """Run evaluation `name`; writes `output_dir/results.json` when `output_dir` is given.

    Multi-model tasks (pca) take a list of models and a list of weights (None entries allowed).
    """
    return get_task(name).run(model, data, weights, output_dir, **(settings or {}))
