"""Losses, stage recipes, where targets come from, and the trainer.

`TeacherHeads` and `TeacherNorm` live in `eupe.models` (they are saved with a model), and
`TrainingDiverged` in `eupe.errors` (VLM training raises it too); the names below stay importable
from here for one release.
"""

from ..errors import TrainingDiverged
from ..models.heads import HEADS_FILE, AdapterHead, TeacherHeads
from ..models.teacher_norm import NORM_FILE, TeacherNorm

__all__ = [
    "HEADS_FILE",
    "NORM_FILE",
    "AdapterHead",
    "DistillConfig",
    "Distiller",
    "TeacherHeads",
    "TeacherNorm",
    "distill",
    "load_config",
    "resume",
    "TrainingDiverged",
]


def __getattr__(name: str):
    # The trainer pulls in teachers and data; import it only when asked for.
    if name in ("distill", "resume", "Distiller"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("DistillConfig", "load_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'eupe.distill' has no attribute {name!r}")
