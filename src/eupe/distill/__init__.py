"""Adapter heads, losses, teacher normalization, stage recipes and the trainer."""

from .heads import HEADS_FILE, AdapterHead, TeacherHeads
from .norm import NORM_FILE, TeacherNorm

__all__ = [
    "HEADS_FILE",
    "NORM_FILE",
    "AdapterHead",
    "DistillConfig",
    "Distiller",
    "TeacherHeads",
    "TeacherNorm",
    "distill",
    "distill_from_cli",
    "load_config",
    "resume",
    "TrainingDiverged",
]


def __getattr__(name: str):
    # The trainer pulls in teachers and data; import it only when asked for.
    if name in ("distill", "distill_from_cli", "resume", "Distiller", "TrainingDiverged"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("DistillConfig", "load_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'eupe.distill' has no attribute {name!r}")
