"""Frozen experts behind one interface (timm, ONNX, a trained eupe checkpoint)."""

from .base import TEACHER_BACKENDS, Teacher, build_teacher, register_teacher
from .eupe_teacher import EupeTeacher
from .onnx_teacher import OnnxTeacher, expose_tensors
from .presets import PRESETS, apply_preset, build_teacher_from_spec, known_teachers
from .spec import TeacherSpec
from .timm_teacher import TimmTeacher

__all__ = [
    "EupeTeacher",
    "OnnxTeacher",
    "PRESETS",
    "TEACHER_BACKENDS",
    "Teacher",
    "TeacherSpec",
    "TimmTeacher",
    "apply_preset",
    "build_teacher",
    "build_teacher_from_spec",
    "expose_tensors",
    "known_teachers",
    "register_teacher",
]
