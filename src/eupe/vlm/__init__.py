"""Vision-language evaluation (paper 8.2): LLaVA-1.5 with an eupe encoder, trained and scored.

`model` builds and loads the LLaVA model (transformers), `text` holds the tokenizer and the
conversation formats, `data` reads the LLaVA JSON format, `train` runs stages A and B with the
transformers `Trainer`, and `bench` scores a model with lmms-eval. Everything here needs the `vlm`
extra: `pip install 'eupe[vlm]'`.
"""

from importlib.util import find_spec

from ..errors import ConfigError

if find_spec("transformers") is None:  # one message for every module of the VLM path
    raise ConfigError("the VLM path needs transformers: pip install 'eupe[vlm]'")
