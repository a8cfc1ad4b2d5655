"""Image sources, mixing, augmentation, resolution pyramids, the teacher-feature cache."""

from .config import AugmentConfig, DataConfig, SourceSpec, validate_data

__all__ = ["AugmentConfig", "DataConfig", "SourceSpec", "validate_data"]
