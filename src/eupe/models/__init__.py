"""Encoders the project trains and ships, and how their weights load."""

from .encoder import Encoder, EncoderOutput, count_params, feature_map_to_output, vit_tokens_to_output
from .heads import AdapterHead, TeacherHeads
from .init import mimetic_init_
from .loading import create_model, load_weights, read_state_dict
from .teacher_norm import TeacherNorm
from .zoo import STUDENTS, ZOO, ZooSpec, get_spec

__all__ = [
    "AdapterHead",
    "Encoder",
    "EncoderOutput",
    "ZOO",
    "STUDENTS",
    "ZooSpec",
    "count_params",
    "create_model",
    "feature_map_to_output",
    "get_spec",
    "mimetic_init_",
    "load_weights",
    "read_state_dict",
    "TeacherHeads",
    "TeacherNorm",
    "vit_tokens_to_output",
]
