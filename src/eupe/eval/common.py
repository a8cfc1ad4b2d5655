"""What every evaluation shares: typed settings with `key=value` overrides, and results.json.

Each benchmark has a settings dataclass; `resolve_settings` merges user overrides into it through
OmegaConf, so a typo or a wrong type fails with one line naming the key and the valid choices.
Every evaluation returns an `EvalResult` and writes it as `results.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError
from ..files import atomic_write

S = TypeVar("S")
RESULTS_FILE = "results.json"


@dataclass
class EvalResult:
    """One benchmark number and everything needed to read it.

    value: a fraction in [0, 1] for accuracy/mIoU/PCK, metres for RMSE, None when not supported.
    """

    task: str
    metric: str
    value: float | None
    model: str
    dataset: str
    settings: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, output_dir: str | Path) -> Path:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        return atomic_write(
            out / RESULTS_FILE, json.dumps(self.to_dict(), indent=1, default=_json_default) + "\n"
        )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def result_from_dict(data: dict[str, Any]) -> EvalResult:
    """The `EvalResult` of one results.json entry (keys it does not know are ignored)."""
    names = {f.name for f in fields(EvalResult)}
    return EvalResult(**{k: v for k, v in data.items() if k in names})


def read_result(path: str | Path) -> EvalResult:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    return result_from_dict(json.loads(path.read_text()))


def not_supported(task: str, metric: str, model: str, dataset: str, settings: Any, reason: str) -> EvalResult:
    """The result of a task that cannot run for this model: value None, exit status 0."""
    return EvalResult(
        task, metric, None, model, dataset, settings_dict(settings), status=f"not supported: {reason}"
    )


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["iterations=10", "k=[10,20]"]` -> {"iterations": 10, "k": [10, 20]} (YAML-typed values)."""
    items = list(items or [])
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (example: iterations=100)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(items))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides {items}: cannot parse ({str(e).splitlines()[0]})") from None


def resolve_settings(cls: type[S], overrides: dict[str, Any] | None = None) -> S:
    """Defaults of `cls` with `overrides` merged in, type-checked; unknown keys are errors."""
    overrides = dict(overrides or {})
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in overrides if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}; valid: {', '.join(names)}"
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(overrides))
        settings = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"bad setting {key} for {cls.__name__}: {str(e).splitlines()[0]}") from None
    check = getattr(settings, "check", None)
    if check is not None:
        check()
    return settings  # type: ignore[return-value]


def settings_dict(settings: Any) -> dict[str, Any]:
    if settings is None:
        return {}
    if isinstance(settings, dict):
        return dict(settings)
    return asdict(settings)


def snap(size: float, stride: int) -> int:
    """Nearest positive multiple of `stride`."""
    return max(stride, int(round(size / stride)) * stride)
