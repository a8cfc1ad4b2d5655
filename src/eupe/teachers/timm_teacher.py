"""The "timm" teacher backend: any timm model as a frozen expert.

Weights come from the Hugging Face Hub (`pretrained=True`, online), from a local file
(`checkpoint=`, .safetensors or .pth read with `weights_only=True` and remapped by the model
module's own timm checkpoint filter), or from a seeded random init (`pretrained=False`; tests and
tiny configs). Input mean/std and the native resolution default to timm's `pretrained_cfg`.

Where the targets come from is configurable, because foundation models differ:
- summary "cls": the class token (DINOv3); "head": timm's `forward_head(pre_logits=True)`, i.e. the
  attention-pooled output for PE-core/SigLIP (no class token); "proj": the full head
  (`pre_logits=False`, e.g. PE-core's CLIP projection into text space); "mean": mean of patch
  tokens; "block:N": block N's output (normed): its class token, else its mean patch token.
- patches "final" (after the final norm) or "block:N" (normed output of block/stage N).
CNNs work too: the feature map becomes patch tokens and the pooled feature the class token.
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

import timm
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..models.encoder import EncoderOutput, feature_map_to_output
from ..models.loading import read_state_dict
from ..models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..models.rope import cache_rope_on_device
from .base import Teacher, register_teacher, rng_devices, weights_to_bf16

SUMMARIES = ("cls", "head", "proj", "mean")


def _block_index(source: str, what: str) -> int | None:
    """ "block:N" -> N; "final" -> None; anything else is a ConfigError."""
    if source.startswith("block:"):
        try:
            return int(source.split(":", 1)[1])
        except ValueError:
            pass
    elif source in ("final", ""):
        return None
    raise ConfigError(f"{what}={source!r}: expected 'final' or 'block:N' (N an integer, e.g. block:-4)")


def _create(name: str, pretrained: bool, kwargs: dict[str, Any], resolution: int | None) -> nn.Module:
    """timm.create_model, asking ViTs for dynamic input size (Stage-3 pyramids feed other sides)."""
    extras: dict[str, Any] = {"dynamic_img_size": True}
    if resolution is not None:
        extras["img_size"] = resolution
    extras = {k: v for k, v in extras.items() if k not in kwargs}
    try:
        return timm.create_model(name, pretrained=pretrained, **extras, **kwargs)
    except TypeError:
        pass  # not a ViT (CNNs take neither keyword): build it plainly below
    except (OSError, RuntimeError, ValueError) as e:
        if pretrained:
            _no_weights(name, e)
        raise
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ConfigError(f"timm model {name!r}: bad constructor kwargs {kwargs}: {e}") from None
    except (OSError, RuntimeError, ValueError) as e:
        if pretrained:
            _no_weights(name, e)
        raise


def _no_weights(name: str, error: Exception) -> None:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise CheckpointError(
        f"timm model {name!r}: could not get its pretrained weights ({type(error).__name__}: {detail[:160]}); "
        "offline, pass checkpoint=<local .safetensors/.pth> (or pretrained=false for a random teacher)"
    ) from None


def _load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local weights file strictly, through the model module's timm checkpoint filter."""
    arch = str(getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__)
    state = read_state_dict(path, f"timm model {arch}")
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:  # foreign layouts fail in many ways inside filters
            raise CheckpointError(
                f"{path}: timm's checkpoint filter rejected it ({type(e).__name__}: {e})"
            ) from None
    own = model.state_dict()
    classifier = str(getattr(model, "pretrained_cfg", {}).get("classifier") or "head")
    # A classifier/projection the teacher does not use (num_classes=0) is dropped, nothing else.
    state = {k: v for k, v in state.items() if k in own or not k.startswith(classifier + ".")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"{path}: does not fit timm model {type(model).__name__}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]} "
            "(check teachers.<name>.model and kwargs)"
        )
    model.load_state_dict(state, strict=True)


class TimmTeacher(Teacher):
    """A frozen timm model behind the teacher interface.

    Also usable on its own: `TimmTeacher("vit_small_patch16_dinov3", pretrained=False).encode(x)`
    returns an `EncoderOutput` for already normalized images (evaluation does exactly this).
    """

    def __init__(
        self,
        model: str,
        checkpoint: str | None = None,
        pretrained: bool = True,
        kwargs: dict[str, Any] | None = None,
        resolution: int | None = None,
        summary: str = "",
        patches: str = "final",
        mean: tuple[float, ...] = (),
        std: tuple[float, ...] = (),
        dtype: str = "fp32",
        seed: int = 0,
    ):
        if not model:
            raise ConfigError(
                "timm teacher: `model` is empty; give a timm model name, e.g. vit_base_patch16_dinov3"
            )
        if not timm.is_model(model.split(".")[0]):
            raise ConfigError(
                f"timm teacher: unknown timm model {model!r} (see timm.list_models('*pattern*'))"
            )
        kwargs = dict(kwargs or {})
        summary = summary or "cls"
        if summary not in SUMMARIES and not summary.startswith("block:"):
            raise ConfigError(f"summary={summary!r}: expected one of {', '.join(SUMMARIES)} or 'block:N'")
        self.summary_block = _block_index(summary, "summary") if summary.startswith("block:") else None
        self.patch_block = _block_index(patches, "patches")
        if summary != "proj":
            kwargs.setdefault("num_classes", 0)  # no classifier: the teacher's targets are features
        with torch.random.fork_rng(devices=rng_devices()):
            torch.manual_seed(seed)
            net = cache_rope_on_device(_create(model, pretrained and not checkpoint, kwargs, resolution))
        if checkpoint:
            _load_checkpoint(net, checkpoint)
        cfg = dict(getattr(net, "pretrained_cfg", None) or {})
        self.is_vit = hasattr(net, "num_prefix_tokens") and hasattr(net, "patch_embed")
        if self.is_vit:
            stride = int(net.patch_embed.patch_size[0])
        else:
            info = net.feature_info
            stride = int(
                info[self.patch_block]["reduction"] if self.patch_block is not None else info[-1]["reduction"]
            )
        if resolution is None:
            resolution = int(cfg.get("input_size", (3, 224, 224))[-1])
        if resolution % stride:
            nearest = max(stride, round(resolution / stride) * stride)
            raise ConfigError(
                f"timm teacher {model!r} expects inputs that are multiples of its patch size {stride}; "
                f"got resolution={resolution} (nearest: {nearest})"
            )
        super().__init__(
            resolution,
            stride,
            tuple(mean) or tuple(cfg.get("mean", IMAGENET_MEAN)),
            tuple(std) or tuple(cfg.get("std", IMAGENET_STD)),
            torch.bfloat16 if dtype == "bf16" else None,
        )
        self.model_name, self.summary, self.patches_source = model, summary, patches
        self.model = net.eval().requires_grad_(False)
        if dtype == "bf16":
            weights_to_bf16(self.model)
        self._check_summary()
        self.patch_dim = self._width(self.patch_block)
        if summary == "head":
            self.cls_dim = int(getattr(net, "head_hidden_size", net.num_features))
        elif summary == "proj":
            self.cls_dim = int(net.num_classes) or int(getattr(net, "head_hidden_size", net.num_features))
        elif summary == "mean":
            self.cls_dim = self.patch_dim
        else:
            self.cls_dim = self._width(self.summary_block)

    # -- facts -----------------------------------------------------------------------------
    @property
    def has_cls_token(self) -> bool:
        m = self.model
        return self.is_vit and getattr(m, "cls_token", None) is not None

    def _width(self, block: int | None) -> int:
        if self.is_vit or block is None:
            return int(self.model.num_features)
        return int(self.model.feature_info[block]["num_chs"])

    def _check_summary(self) -> None:
        if self.summary == "cls" and self.is_vit and not self.has_cls_token:
            raise ConfigError(
                f"timm teacher {self.model_name!r} has no class token (num_prefix_tokens="
                f"{self.model.num_prefix_tokens}); use summary=head (attention-pooled) or summary=mean"
            )

    # -- forward ---------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> EncoderOutput:
        """Targets for images already resized and normalized for this teacher."""
        h, w = images.shape[-2:]
        if self.is_vit:
            return self._encode_vit(images, (int(h) // self.stride, int(w) // self.stride))
        return self._encode_cnn(images)

    def _vit_block(self, images: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix tokens [B,P,D], patch tokens [B,N,D]) of block `index`, after the final norm."""
        out = self.model.forward_intermediates(
            images,
            indices=[index],
            norm=True,
            output_fmt="NLC",
            return_prefix_tokens=True,
            intermediates_only=True,
        )
        patches, prefix = out[0]
        return prefix, patches

    def _encode_vit(self, images: torch.Tensor, grid: tuple[int, int]) -> EncoderOutput:
        m = self.model
        npt = int(m.num_prefix_tokens)
        need_final = self.patch_block is None or self.summary in ("cls", "head", "proj")
        tokens = m.forward_features(images) if need_final else None
        if self.patch_block is None:
            patches = tokens[:, npt:]
        else:
            patches = self._vit_block(images, self.patch_block)[1]
        if self.summary == "cls":
            cls = tokens[:, 0]
        elif self.summary in ("head", "proj"):
            cls = m.forward_head(tokens, pre_logits=self.summary == "head")
        elif self.summary == "mean":
            cls = patches.mean(dim=1)
        else:
            prefix, block_patches = self._vit_block(images, self.summary_block)
            cls = prefix[:, 0] if self.has_cls_token else block_patches.mean(dim=1)
        return EncoderOutput(cls=cls, patches=patches, registers=None, grid=grid)

    def _encode_cnn(self, images: torch.Tensor) -> EncoderOutput:
        m = self.model
        head_norm = getattr(getattr(m, "head", None), "norm", None)
        norm = head_norm if isinstance(head_norm, nn.LayerNorm) else None
        fmap = m.forward_features(images)
        if self.patch_block is None:
            out = feature_map_to_output(fmap, norm)
        else:
            stage = m.forward_intermediates(images, indices=[self.patch_block], intermediates_only=True)[0]
            out = feature_map_to_output(stage)
        if self.summary in ("head", "proj"):
            cls = m.forward_head(fmap, pre_logits=self.summary == "head")
        elif self.summary == "mean":
            cls = out.patches.mean(dim=1)
        elif self.summary == "cls":
            cls = out.cls
        else:
            stage = m.forward_intermediates(images, indices=[self.summary_block], intermediates_only=True)[0]
            cls = stage.mean(dim=(2, 3))
        return EncoderOutput(cls=cls, patches=out.patches, registers=None, grid=out.grid)


@register_teacher("timm")
def build_timm_teacher(model: str = "", seed: int = 0, name: str = "", **spec: Any) -> TimmTeacher:
    """Factory for the "timm" backend; `name` (the config key) varies the random-init seed."""
    return TimmTeacher(model, seed=seed + (zlib.crc32(name.encode()) % 10_000 if name else 0), **spec)
