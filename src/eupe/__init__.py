"""eupe: the Efficient Universal Perception Encoder recipe, end to end.

`import eupe` is instant: the public names below load their module (torch, timm) on first use
(PEP 562), so `eupe --help` and tools that only need the errors never pay for them.
"""

from __future__ import annotations

import importlib

from .errors import CheckpointError, ConfigError, EupeError

__version__ = "0.1.0"

# public name -> the submodule that defines it, imported on first access
_LAZY = {name: "models" for name in ("Encoder", "EncoderOutput", "count_params", "create_model")}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Encoder",
    "EncoderOutput",
    "EupeError",
    "count_params",
    "create_model",
    "__version__",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'eupe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
