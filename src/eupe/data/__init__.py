"""Image sources, mixing, augmentation, resolution pyramids, the teacher-feature cache."""

from .augment import apply_params, crop_view, make_view, replay_view, sample_params
from .config import AugmentConfig, DataConfig, SourceSpec, decode_side, validate_data
from .index import Index
from .index_build import build_index
from .loader import Batch, Loader, build_loader, load_source_image, open_sources, shard_items
from .order import Shuffle
from .photometric import finish_views
from .sources import IMAGE_EXTENSIONS, BadImage, decode_image, open_source, synthetic_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "AugmentConfig",
    "BadImage",
    "Batch",
    "DataConfig",
    "Index",
    "Loader",
    "Shuffle",
    "SourceSpec",
    "apply_params",
    "build_index",
    "build_loader",
    "crop_view",
    "decode_side",
    "finish_views",
    "load_source_image",
    "make_view",
    "open_sources",
    "decode_image",
    "open_source",
    "replay_view",
    "sample_params",
    "shard_items",
    "synthetic_image",
    "validate_data",
]
