"""LLaVA-1.5 with an eupe encoder as its vision tower, built from transformers' own Llava classes.

The only change to `LlavaForConditionalGeneration` is which encoder tokens reach the projector:
an eupe encoder's final, normed output (`last_hidden_state`) without its prefix tokens, i.e. the
patch tokens alone (a ViT drops its class token and 4 registers, a ConvNeXt its pooled token).
At the paper's 384 px a patch-16 ViT gives 576 of them, as CLIP-L/14 does at 336 px. That is the
layer the encoders are distilled at; for a ViT, `vision_feature_layer` set to another index takes
that block's output instead (before the final norm), still without the prefix tokens. A ConvNeXt
takes -1 only (see `check_feature_layer`).

A model folder (`final/` of `eupe vlm train`) is an ordinary transformers folder:
`EupeLlavaForConditionalGeneration.from_pretrained(DIR)` and `AutoProcessor.from_pretrained(DIR)`
load it (`load_llava(DIR)` does both). Plain `LlavaForConditionalGeneration` would feed the prefix
tokens to the projector, and in transformers 5.24 it misreads the nested DINOv3 tower's weights. The processor pads an image to a square with the mean colour (LLaVA-1.5's "pad"), then
resizes it to the configured size and normalises it as the encoder expects.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import transformers as _tf
from PIL import Image
from safetensors import safe_open
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava import modeling_llava

from ..errors import CheckpointError, ConfigError
from ..models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from .text import IMAGE, byte_tokenizer, chat_prompt, prepare_tokenizer, sentencepiece_compat


def prefix_tokens(vision_config: Any) -> int:
    """Tokens before the patch tokens in the encoder's output: class token + registers, or pooled."""
    return 1 + int(getattr(vision_config, "num_register_tokens", 0) or 0)


def vision_stride(vision_config: Any) -> int:
    """Pixels per patch token: the ViT patch size, or 32 for a ConvNeXt."""
    return int(getattr(vision_config, "patch_size", None) or 32)


def check_feature_layer(vision_config: Any, layer: Any) -> None:
    """Refuse a `vision_feature_layer` the tower cannot feed to the projector, naming those it can.

    A ViT's hidden states (the patch embedding, then each block) all have the projector's width and
    token count, so -1 (the final, normed output), 0 (the embedding), k (block k, before the norm)
    and -k (counted from the end) all work. A ConvNeXt's hidden states are its input and its four
    stages: the first three have other widths and 4 to 64 times the last one's tokens, which neither
    the projector nor the processor's image-token count fits, and the last one is the final output
    less its norm. So a ConvNeXt serves -1 only.
    """
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"vision_feature_layer is one int (an eupe vision tower), got {layer!r}")
    if getattr(vision_config, "model_type", None) == "dinov3_convnext":
        if layer != -1:
            raise ConfigError(
                f"vision_feature_layer {layer}: a ConvNeXt tower feeds the projector its final output only "
                "(-1); its earlier stages have other widths and token counts"
            )
        return
    blocks = int(vision_config.num_hidden_layers)
    if not -blocks - 1 <= layer <= blocks:
        raise ConfigError(
            f"vision_feature_layer {layer}: this ViT has {blocks} blocks; take -1 (the final output), "
            f"0 (the patch embedding), 1..{blocks} or -{blocks + 1}..-2"
        )


class EupeLlavaModel(modeling_llava.LlavaModel):
    def __init__(self, config: Any):
        check_feature_layer(config.vision_config, config.vision_feature_layer)  # e.g. an edited config.json
        super().__init__(config)

    def get_image_features(self, pixel_values: torch.Tensor, vision_feature_layer=None, **kwargs: Any):
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        check_feature_layer(self.config.vision_config, layer)
        out = self.vision_tower(pixel_values, output_hidden_states=layer != -1, return_dict=True)
        tokens = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        tokens = tokens[:, prefix_tokens(self.config.vision_config) :]
        features = self.multi_modal_projector(tokens)
        return BaseModelOutputWithPooling(
            last_hidden_state=out.last_hidden_state, pooler_output=list(features)
        )


class EupeLlavaForConditionalGeneration(modeling_llava.LlavaForConditionalGeneration):
    """`LlavaForConditionalGeneration` whose vision features are the encoder's patch tokens."""

    def __init__(self, config: Any):
        modeling_llava.LlavaPreTrainedModel.__init__(self, config)
        self.model = EupeLlavaModel(config)
        self.lm_head = torch.nn.Linear(
            config.text_config.hidden_size, config.text_config.vocab_size, bias=False
        )
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' `from_pretrained`, plus a strict read of the vision tower's tensors.

        transformers (5.24) saves a DINOv3 tower nested in Llava under its Hub names
        (`vision_tower.layer.0`, without the inner `model.`), and its renaming on the way back
        garbles them (`layer_scale1` matches its `layer.` pattern). The tower (under 100M
        parameters) is therefore read here by its module names; everything else loads as usual,
        and a tensor missing outside the tower is an error.
        """
        want_info = kwargs.pop("output_loading_info", False)
        verbosity = _tf.logging.get_verbosity()
        _tf.logging.set_verbosity_error()  # its warnings about the tower's names are handled below
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        finally:
            _tf.logging.set_verbosity(verbosity)
        missing = sorted(k for k in info["missing_keys"] if not k.startswith(TOWER))
        if missing:
            raise CheckpointError(
                f"{pretrained_model_name_or_path}: its weights lack {len(missing)} tensors of the model, "
                f"e.g. {missing[0]}"
            )
        _load_vision_tower_weights(model, _local_folder(pretrained_model_name_or_path, kwargs))
        if want_info:
            keep = {
                k: [x for x in v if not str(x).startswith(TOWER)]
                for k, v in info.items()
                if k.endswith("keys")
            }
            return model, {**info, **keep}
        return model


def load_vision_tower(encoder: str, weights: str | None = None) -> Any:
    """A transformers DINOv3 model from a transformers folder, or any eupe model spec (converted)."""
    from ..models.hf import is_hf_dir, to_hf_model

    if os.path.isdir(encoder) and is_hf_dir(encoder):
        if weights:
            raise ConfigError(
                f"{encoder} is a transformers folder with its own weights; drop encoder_weights"
            )
        return _tf.AutoModel.from_pretrained(encoder)
    from ..models import create_model

    return to_hf_model(create_model(encoder, weights=weights))


def load_language_model(spec: str | dict[str, Any], dtype: torch.dtype | None = None) -> Any:
    """A causal LM: a Hub name or folder (pretrained), or a config mapping (random init, for tests)."""
    if isinstance(spec, dict):
        spec = dict(spec)
        kind = spec.pop("model_type", None)
        if not kind:
            raise ConfigError("language_model as a mapping needs model_type (e.g. llama) and its sizes")
        config = _tf.AutoConfig.for_model(kind, **spec)
        return _tf.AutoModelForCausalLM.from_config(config).to(dtype or torch.float32)
    try:
        return _tf.AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    except OSError as e:
        raise CheckpointError(
            f"language model {spec!r}: {str(e).splitlines()[0]} (pass a local folder when offline)"
        ) from None


def load_tokenizer(spec: str) -> Any:
    if spec == "byte":
        return byte_tokenizer()
    sentencepiece_compat()  # Vicuna ships tokenizer.model only
    try:
        return prepare_tokenizer(_tf.AutoTokenizer.from_pretrained(spec, use_fast=True))
    except OSError as e:
        raise CheckpointError(f"tokenizer {spec!r}: {str(e).splitlines()[0]}") from None


def make_processor(tokenizer: Any, image_size: int, stride: int) -> Any:
    image_processor = _tf.CLIPImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # bicubic
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    return _tf.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=stride,
        vision_feature_select_strategy="full",  # the model drops the prefix tokens itself
        num_additional_image_tokens=0,
        chat_template=tokenizer.chat_template,
    )


def build_llava(
    encoder: str,
    language_model: str | dict[str, Any],
    *,
    encoder_weights: str | None = None,
    tokenizer: str | None = None,
    image_size: int | None = None,
    dtype: torch.dtype | None = None,
    vision_feature_layer: int = -1,
) -> tuple[EupeLlavaForConditionalGeneration, Any]:
    """A fresh LLaVA-1.5: pretrained encoder and language model, a new 2-layer GELU projector.

    `dtype` is the language model's (e.g. bf16 when it stays frozen); the encoder and the projector
    stay in float32, and the projected features are cast to the language model's dtype.

    `image_size` None is the paper's: 336 px for patch-14 encoders, else 384 (576 tokens at 14/16).
    `vision_feature_layer` is checked here, before the language model loads (`check_feature_layer`).
    """
    vision = load_vision_tower(encoder, encoder_weights)
    check_feature_layer(vision.config, vision_feature_layer)
    stride = vision_stride(vision.config)
    image_size = image_size or (336 if stride == 14 else 384)
    if image_size % stride:
        raise ConfigError(f"image_size {image_size} is not a multiple of the encoder's stride {stride}")
    lm = load_language_model(language_model, dtype)
    if tokenizer is None:
        if isinstance(language_model, dict):
            raise ConfigError("a language model built from a config needs `tokenizer` (e.g. byte)")
        tokenizer = language_model
    tok = load_tokenizer(tokenizer)
    if len(tok) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tok))
    vcfg = vision.config
    if not hasattr(vcfg, "hidden_size"):  # ConvNeXt: the projector reads the last stage's width
        vcfg.hidden_size = int(vcfg.hidden_sizes[-1])
    config = _tf.LlavaConfig(
        vision_config=vcfg.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
        projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="full",
        image_seq_length=(image_size // stride) ** 2,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        model = EupeLlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = getattr(lm, lm.base_model_prefix)
    model.lm_head = lm.get_output_embeddings()
    model.model.multi_modal_projector = modeling_llava.LlavaMultiModalProjector(config)
    return model, make_processor(tok, image_size, stride)


TOWER = "model.vision_tower."


def _tower_name(key: str) -> str:
    """A saved vision-tower key as the module names it (`...vision_tower.model.layer.0...`)."""
    return re.sub(r"^model\.vision_tower\.(layer|stages)\.", r"model.vision_tower.model.\1.", key)


def _local_folder(source: Any, kwargs: dict[str, Any]) -> Path:
    """The folder holding `source`'s weight files (a Hub id resolves to its cached snapshot)."""
    if os.path.isdir(source):
        return Path(source)
    from huggingface_hub import snapshot_download

    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors"], **hub))


def _load_vision_tower_weights(model: Any, folder: Path) -> None:
    """Load the vision tower's tensors from `folder`'s safetensors by the module's names, strictly."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    got: dict[str, torch.Tensor] = {}
    for name in files or ["model.safetensors"]:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(TOWER):
                    got[_tower_name(key)] = f.get_tensor(key)
    want = {k for k in model.state_dict() if k.startswith(TOWER)}
    if set(got) != want:
        lack = sorted(want - set(got)) or sorted(set(got) - want)
        raise CheckpointError(
            f"{folder}: its vision tower does not fit the model's config (first: {lack[0]})"
        )
    tower = model.model.vision_tower
    state = {k[len(TOWER) :]: v.to(next(tower.parameters()).dtype) for k, v in got.items()}
    tower.load_state_dict(state, strict=True)


def load_llava(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, processor) of a folder written by `eupe vlm train` (its `final/` or a checkpoint).

    `dtype` is the language model's; the encoder and the projector stay float32 (as `build_llava`).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a LLaVA model folder (no config.json); pass a run's final/")
    model = EupeLlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    if dtype is not None and dtype != torch.float32:
        model.model.vision_tower.float()
        model.model.multi_modal_projector.float()
    return model.eval(), _tf.AutoProcessor.from_pretrained(folder)


def square(image: Image.Image, fill: tuple[float, ...] = IMAGENET_MEAN) -> Image.Image:
    """Pad `image` to a square with the `fill` colour (LLaVA-1.5's `image_aspect_ratio: pad`)."""
    image = image.convert("RGB")
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new("RGB", (side, side), tuple(int(round(255 * c)) for c in fill))
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def reply(
    model: Any,
    processor: Any,
    question: str,
    images: list[Image.Image],
    *,
    max_new_tokens: int,
    until: list[str] | tuple[str, ...] = (),
    num_beams: int = 1,
    temperature: float = 0.0,
    top_p: float | None = None,
) -> str:
    """The model's answer to one question about `images` (PIL), in the prompt training used.

    Images are padded to a square (`square`); several images without `<image>` markers get one each
    in front. Greedy unless `temperature` > 0; the answer is cut at the first of `until`.
    """
    images = [square(image) for image in images or []]
    if len(images) > 1 and IMAGE not in question:
        question = f"{IMAGE}\n" * len(images) + question
    prompt = chat_prompt(question, image=bool(images))
    device = next(model.parameters()).device
    inputs = processor(text=prompt, images=images or None, return_tensors="pt").to(device)
    if "pixel_values" in inputs:  # the encoder's dtype, which may differ from the language model's
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.model.vision_tower.parameters()).dtype)
    tok = processor.tokenizer
    options: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        do_sample=False,
    )
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_p=top_p)
    if until:
        options.update(stop_strings=list(until), tokenizer=tok)
    with torch.inference_mode():
        out = model.generate(**inputs, **options)
    text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for stop in until:
        text = text.split(stop)[0]
    return text.strip()
