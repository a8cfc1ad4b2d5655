"""Encoders in Hugging Face transformers' format: `DINOv3ViTModel` and `DINOv3ConvNextModel` folders.

The EUPE architectures are DINOv3's (timm `vit_*_patch16_dinov3_qkvb`, `convnext_*`), and
transformers has both classes, so an encoder converts one to one: `save_hf(encoder, folder)` writes
a folder that `transformers.AutoModel.from_pretrained(folder)` loads (and that can go to the Hub
as it is), and `load_hf(folder)` reads it back into an eupe `Encoder` (what `eupe.create_model`
does with such a folder). The names map directly, except that a ViT's fused qkv projection splits
into q/k/v (its key has no bias: `key_bias=False`), and transformers' unused `mask_token` is saved
as zeros. The folder's config records `eupe_arch` (and `eupe_overrides`) so the way back rebuilds
the same zoo architecture.

Outputs agree exactly: `last_hidden_state` is [cls, registers, patches] (ViT) or [pooled, patches]
(ConvNeXt), after the final norm, i.e. `EncoderOutput.cls/registers/patches` in that order.
`eupe export MODEL --format hf` checks this on every export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .encoder import Encoder

HF_TYPES = ("dinov3_vit", "dinov3_convnext")
_BLOCK = {  # ours -> transformers, inside one ViT block (q/k/v handled apart)
    "gamma_1": "layer_scale1.lambda1",
    "gamma_2": "layer_scale2.lambda1",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attn.proj.weight": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "mlp.fc1.weight": "mlp.up_proj.weight",
    "mlp.fc1.bias": "mlp.up_proj.bias",
    "mlp.fc2.weight": "mlp.down_proj.weight",
    "mlp.fc2.bias": "mlp.down_proj.bias",
}
_CONV_BLOCK = {  # ours -> transformers, inside one ConvNeXt block
    "gamma": "gamma",
    "conv_dw": "depthwise_conv",
    "norm": "layer_norm",
    "mlp.fc1": "pointwise_conv1",
    "mlp.fc2": "pointwise_conv2",
}


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            "the transformers format needs `transformers`: pip install 'eupe[export]' (or eupe[vlm])"
        ) from None
    return transformers


def _pairs(model: Encoder) -> list[tuple[str, str, int | None]]:
    """(our name, transformers name, qkv chunk or None) for every tensor of `model`."""
    if model.family == "vit":
        pairs = [
            ("backbone.cls_token", "embeddings.cls_token", None),
            ("backbone.reg_token", "embeddings.register_tokens", None),
            ("backbone.patch_embed.proj.weight", "embeddings.patch_embeddings.weight", None),
            ("backbone.patch_embed.proj.bias", "embeddings.patch_embeddings.bias", None),
            ("backbone.norm.weight", "norm.weight", None),
            ("backbone.norm.bias", "norm.bias", None),
        ]
        for i in range(len(model.backbone.blocks)):
            ours, theirs = f"backbone.blocks.{i}.", f"model.layer.{i}."
            for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                pairs.append((ours + "attn.qkv.weight", f"{theirs}attention.{proj}.weight", part))
            pairs.append((ours + "attn.q_bias", theirs + "attention.q_proj.bias", None))
            pairs.append((ours + "attn.v_bias", theirs + "attention.v_proj.bias", None))
            pairs += [(ours + a, theirs + b, None) for a, b in _BLOCK.items()]
        return pairs
    pairs = [
        (f"backbone.stem.{j}.{t}", f"model.stages.0.downsample_layers.{j}.{t}", None)
        for j in (0, 1)
        for t in ("weight", "bias")
    ]
    for s, stage in enumerate(model.backbone.stages):
        if s:
            pairs += [
                (
                    f"backbone.stages.{s}.downsample.{j}.{t}",
                    f"model.stages.{s}.downsample_layers.{j}.{t}",
                    None,
                )
                for j in (0, 1)
                for t in ("weight", "bias")
            ]
        for k in range(len(stage.blocks)):
            ours, theirs = f"backbone.stages.{s}.blocks.{k}.", f"model.stages.{s}.layers.{k}."
            for a, c in _CONV_BLOCK.items():
                for t in (".weight", ".bias") if a != "gamma" else ("",):
                    pairs.append((ours + a + t, theirs + c + t, None))
    pairs += [
        ("backbone.head.norm.weight", "layer_norm.weight", None),
        ("backbone.head.norm.bias", "layer_norm.bias", None),
    ]
    return pairs


def _config(model: Encoder) -> tuple[str, dict[str, Any]]:
    """transformers' model_type and config arguments for `model`."""
    b = model.backbone
    if model.family == "vit":
        sd = model.state_dict()
        if "backbone.blocks.0.mlp.fc1.weight" not in sd or "backbone.blocks.0.attn.qkv.weight" not in sd:
            raise CheckpointError(
                f"{model.arch}: only ViTs with a plain GELU MLP and fused qkv (EUPE ViT-T/S/B) convert to "
                "transformers' DINOv3ViTModel"
            )
        return "dinov3_vit", {
            "hidden_size": model.embed_dim,
            "num_hidden_layers": len(b.blocks),
            "num_attention_heads": b.blocks[0].attn.num_heads,
            "intermediate_size": int(sd["backbone.blocks.0.mlp.fc1.weight"].shape[0]),
            "num_register_tokens": model.num_registers,
            "patch_size": model.stride,
            "layer_norm_eps": b.norm.eps,
            "rope_theta": float(b.rope.temperature),
            "query_bias": True,
            "key_bias": False,
            "value_bias": True,
            "use_gated_mlp": False,
        }
    return "dinov3_convnext", {
        "depths": [len(s.blocks) for s in b.stages],
        "hidden_sizes": [int(s.blocks[0].conv_dw.weight.shape[0]) for s in b.stages],
        "layer_norm_eps": b.head.norm.eps,
    }


def to_hf_state(model: Encoder) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(model_type, config arguments, state dict) of `model` in transformers' DINOv3 layout."""
    kind, config = _config(model)
    sd = model.state_dict()
    state = {
        theirs: (sd[ours] if part is None else sd[ours].chunk(3)[part]).contiguous()
        for ours, theirs, part in _pairs(model)
    }
    if kind == "dinov3_vit":
        state["embeddings.mask_token"] = torch.zeros(1, 1, model.embed_dim)  # unused at inference
    return kind, config, state


def to_hf_model(model: Encoder) -> Any:
    """`model` as a transformers `DINOv3ViTModel` / `DINOv3ConvNextModel` holding the same weights."""
    transformers = _require_transformers()
    kind, kwargs, state = to_hf_state(model)
    cls = {"dinov3_vit": "DINOv3ViT", "dinov3_convnext": "DINOv3ConvNext"}[kind]
    config = getattr(transformers, f"{cls}Config")(
        **kwargs, eupe_arch=model.arch, eupe_overrides=dict(model.overrides or {})
    )
    hf = getattr(transformers, f"{cls}Model")(config)  # not on "meta": its RoPE buffers are not saved
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def save_hf(model: Encoder, folder: str | os.PathLike) -> Path:
    """Write `model` as a transformers folder (config.json + model.safetensors)."""
    folder = Path(folder)
    to_hf_model(model).save_pretrained(folder)
    return folder


def is_hf_dir(folder: str | os.PathLike) -> bool:
    """A folder holding a transformers DINOv3 config (as `save_hf` writes)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in HF_TYPES
    except ValueError:
        return False


def load_hf(folder: str | os.PathLike) -> Encoder:
    """The eupe `Encoder` of a folder written by `save_hf` (weights checked strictly)."""
    transformers = _require_transformers()
    config = json.loads((Path(folder) / "config.json").read_text())
    arch = config.get("eupe_arch")
    if not arch:
        raise CheckpointError(
            f"{folder}: a transformers {config.get('model_type')} folder without `eupe_arch`; only folders "
            "written by `eupe export --format hf` load as eupe encoders"
        )
    model = Encoder(arch=arch, overrides=config.get("eupe_overrides") or None)
    theirs = transformers.AutoModel.from_pretrained(folder).state_dict()
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    for mine, name, part in _pairs(model):
        if name not in theirs:
            raise CheckpointError(f"{folder}: its weights lack {name!r}, which {arch} needs")
        target = ours[mine] if part is None else ours[mine].chunk(3)[part]
        if theirs[name].shape != target.shape:
            raise CheckpointError(
                f"{folder}: {name} has shape {tuple(theirs[name].shape)}, {arch} needs {tuple(target.shape)}"
            )
        target.copy_(theirs[name])
    model.load_state_dict(ours, strict=True)
    return model
