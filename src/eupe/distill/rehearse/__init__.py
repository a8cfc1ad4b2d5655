"""`eupe distill CONFIG --rehearse WORLD`: the real trainer at WORLD ranks, on one CPU core, with fake
tensors; per-rank peak memory by category, FLOPs, and the verdict against a GPU. See docs/scale.md."""

from .cluster import HostConstants, fake_cluster
from .memory import CATEGORIES, MemoryTracker
from .report import exit_code, format_rehearsal
from .run import GPUS, rehearse

__all__ = [
    "CATEGORIES",
    "GPUS",
    "HostConstants",
    "MemoryTracker",
    "exit_code",
    "fake_cluster",
    "format_rehearsal",
    "rehearse",
]
