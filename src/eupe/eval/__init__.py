"""Evaluations of frozen encoders: one module per benchmark, plus the report.

The Python API mirrors `eupe eval ...`: each function takes a model (zoo name, folder, timm name,
or module), the data root, optional weights and output_dir, and `key=value` settings, and returns
an `EvalResult` (also written as `<output_dir>/results.json`).
"""

from .common import EvalResult, read_result
from .depth import depth
from .knn import knn
from .models import EvalModel, load_model
from .pca import pca
from .report import TASKS, load_suite_config, run_suite
from .seg import seg
from .spair import spair
from .zeroshot import zeroshot

__all__ = [
    "TASKS",
    "EvalModel",
    "EvalResult",
    "depth",
    "knn",
    "load_model",
    "load_suite_config",
    "pca",
    "read_result",
    "run_suite",
    "seg",
    "spair",
    "zeroshot",
]
