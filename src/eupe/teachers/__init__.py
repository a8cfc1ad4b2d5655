"""Frozen experts behind one interface (timm, ONNX, a trained eupe checkpoint)."""

from .base import TEACHER_BACKENDS, Teacher, build_teacher, register_teacher

__all__ = ["TEACHER_BACKENDS", "Teacher", "build_teacher", "register_teacher"]
