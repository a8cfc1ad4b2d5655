"""Evaluations of frozen encoders: one module per benchmark, plus the report.

The Python API mirrors `eupe eval ...`: each function takes a model (zoo name, folder, timm name,
or module), the data root, optional weights and output_dir, and `key=value` settings, and returns
an `EvalResult` (also written as `<output_dir>/results.json`). Each benchmark registers itself with
`@register_task` (see `registry`); importing its module here puts it in `TASKS`.
"""

from .common import EvalResult, read_result
from .models import EvalModel, load_model
from .registry import TASKS, TaskSpec, get_task, register_task, run_task

# isort: off
# registration order is the order of `eupe eval --help`: the paper's Table 1, then Figure 4
from .knn import knn
from .zeroshot import zeroshot
from .seg import seg
from .depth import depth
from .spair import spair
from .pca import pca

# isort: on
from .report import load_suite_config, run_suite

__all__ = [
    "TASKS",
    "EvalModel",
    "EvalResult",
    "TaskSpec",
    "depth",
    "knn",
    "get_task",
    "load_model",
    "load_suite_config",
    "pca",
    "read_result",
    "register_task",
    "run_suite",
    "run_task",
    "seg",
    "spair",
    "zeroshot",
]
