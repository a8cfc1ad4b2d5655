"""Adapter heads, losses, teacher normalization, stage recipes and the trainer."""

from .heads import HEADS_FILE, AdapterHead, TeacherHeads
from .norm import NORM_FILE, TeacherNorm

__all__ = ["HEADS_FILE", "NORM_FILE", "AdapterHead", "TeacherHeads", "TeacherNorm"]
