"""TeacherNorm moved to `eupe.models.teacher_norm` (state saved with a model); this module keeps
its alias for one release and the measurement, which is part of training."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..models.encoder import EncoderOutput
from ..models.teacher_norm import NORM_FILE, TeacherNorm

__all__ = ["NORM_FILE", "TeacherNorm", "measure_norm"]


def measure_norm(
    norm: TeacherNorm,
    teachers: dict[str, Callable[[torch.Tensor], EncoderOutput]],
    views: Iterable[torch.Tensor],
) -> TeacherNorm:
    """Observe every teacher on each batch of `views` (at native resolution), add the sums up over
    all ranks (collective under torchrun), then freeze. The one place TeacherNorm is measured."""
    for batch in views:
        for name, teacher in teachers.items():
            norm.observe(name, teacher(batch))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for name, buf in norm.named_buffers():
            if name.endswith(("_sum", "_sumsq", "_count")):
                torch.distributed.all_reduce(buf)
    norm.freeze()
    return norm
