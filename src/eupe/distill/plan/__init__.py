"""`eupe plan`: what a distillation config costs before it runs (FLOPs, memory per GPU, days).

The per-image numbers are measured on the meta device (`measure`): the real timm/eupe modules
at the real resolutions, with no weights allocated. Everything else is arithmetic on those numbers;
each formula is written next to its value in the JSON and in the printed table, so a reader can
redo the sums by hand. See docs/plan.md.
"""

from __future__ import annotations

from .estimate import (
    GPUS,
    Gpu,
    heads_activation_bytes,
    heads_forward_flops,
    heads_params,
    measure_costs,
    memory,
    plan,
)
from .measure import ModelCost, size_model
from .report import format_plan
from .spec import NetSpec, PlanSpec, load_plan_spec, spec_from_config

__all__ = [
    "GPUS",
    "Gpu",
    "ModelCost",
    "NetSpec",
    "PlanSpec",
    "format_plan",
    "heads_activation_bytes",
    "heads_forward_flops",
    "heads_params",
    "load_plan_spec",
    "measure_costs",
    "memory",
    "plan",
    "size_model",
    "spec_from_config",
]
