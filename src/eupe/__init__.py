"""eupe: the Efficient Universal Perception Encoder recipe, end to end."""

from .errors import CheckpointError, ConfigError, EupeError
from .models import Encoder, EncoderOutput, count_params, create_model

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "ConfigError",
    "Encoder",
    "EncoderOutput",
    "EupeError",
    "count_params",
    "create_model",
    "__version__",
]
