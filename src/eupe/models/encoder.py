"""`Encoder`: every EUPE network behind one surface, images in, `EncoderOutput` out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .rope import cache_rope_on_device
from .zoo import ZooSpec, get_spec


@dataclass
class EncoderOutput:
    """Normalized outputs of a vision encoder.

    cls: [B, D] class token (ViT) or pooled feature (CNN), after the final norm.
    patches: [B, N, D] patch tokens after the final norm, row-major over `grid`.
    registers: [B, R, D] register/storage tokens, or None.
    grid: (h, w) of the patch tokens.
    """

    cls: torch.Tensor
    patches: torch.Tensor
    registers: torch.Tensor | None
    grid: tuple[int, int]

    def patch_map(self) -> torch.Tensor:
        """Patch tokens as a [B, D, h, w] feature map."""
        b, _, d = self.patches.shape
        return self.patches.transpose(1, 2).reshape(b, d, *self.grid)


def check_input_size(height: int, width: int, stride: int, what: str) -> None:
    if height % stride or width % stride or height <= 0 or width <= 0:
        raise ValueError(
            f"{what} needs H and W that are positive multiples of its stride {stride}; "
            f"got {height}x{width} (nearest valid: {max(stride, round(height / stride) * stride)}x"
            f"{max(stride, round(width / stride) * stride)})"
        )


def vit_tokens_to_output(
    tokens: torch.Tensor, num_prefix: int, num_registers: int, grid: tuple[int, int]
) -> EncoderOutput:
    """Split a normed ViT token sequence [cls?, registers..., patches...] into an EncoderOutput.

    Models without a class token (num_prefix == num_registers) get the mean patch token as `cls`.
    """
    patches = tokens[:, num_prefix:]
    has_cls = num_prefix > num_registers
    cls = tokens[:, 0] if has_cls else patches.mean(dim=1)
    registers = tokens[:, num_prefix - num_registers : num_prefix] if num_registers else None
    return EncoderOutput(cls=cls, patches=patches, registers=registers, grid=grid)


def feature_map_to_output(fmap: torch.Tensor, norm: nn.Module | None = None) -> EncoderOutput:
    """A CNN feature map [B, C, h, w] as an EncoderOutput: cls is the mean-pooled map.

    Like the official EUPE ConvNeXt, the same LayerNorm normalizes the pooled feature and every
    spatial token.
    """
    b, c, h, w = fmap.shape
    tokens = torch.cat([fmap.mean(dim=(2, 3)).unsqueeze(1), fmap.flatten(2).transpose(1, 2)], dim=1)
    if norm is not None:
        tokens = F.layer_norm(tokens, (c,), norm.weight, norm.bias, norm.eps)
    return EncoderOutput(cls=tokens[:, 0], patches=tokens[:, 1:], registers=None, grid=(h, w))


class Encoder(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="eupe",
    tags=["eupe", "vision-encoder", "image-feature-extraction"],
):
    """A zoo architecture (see `eupe.models.zoo`) built from timm's classes.

    `overrides` are timm keyword arguments, e.g. ``{"drop_path_rate": 0.1}`` or
    ``{"rope_rescale_coords": 2}`` (ViT training-time RoPE coordinate rescale). They are stored in
    the saved config, so a checkpoint rebuilds exactly the module that wrote it.
    """

    def __init__(self, arch: str, overrides: dict[str, Any] | None = None):
        super().__init__()
        self.spec: ZooSpec = get_spec(arch)
        self.arch = arch
        self.overrides = dict(overrides or {})
        kwargs = {**self.spec.timm_kwargs, **self.overrides}
        self.backbone = timm.create_model(self.spec.timm_name, pretrained=False, num_classes=0, **kwargs)
        cache_rope_on_device(self.backbone)  # no host->device copy of RoPE coordinates per forward

    # -- facts -----------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def stride(self) -> int:
        return self.spec.stride

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def num_registers(self) -> int:
        return self.spec.num_registers

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        return height // self.stride, width // self.stride

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks, in order (ViT blocks; ConvNeXt blocks of every stage): the units that
        FSDP shards and `torch.compile` compiles one by one."""
        if self.family == "vit":
            return list(self.backbone.blocks)
        return [block for stage in self.backbone.stages for block in stage.blocks]

    # -- forward ---------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> EncoderOutput:
        height, width = images.shape[-2:]
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            check_input_size(int(height), int(width), self.stride, self.arch)
        if self.family == "vit":
            tokens = self.backbone.forward_features(images)
            return vit_tokens_to_output(
                tokens, self.backbone.num_prefix_tokens, self.num_registers, self.grid_for(height, width)
            )
        fmap = self.backbone.forward_features(images)
        return feature_map_to_output(fmap, self.backbone.head.norm)

    # -- persistence -----------------------------------------------------------------------
    @classmethod
    def _from_pretrained(cls, *, model_id: str, **hub_kwargs: Any) -> Encoder:
        # Loading always goes through the strict loader so errors are uniform.
        from .loading import load_pretrained_dir

        return load_pretrained_dir(model_id, **hub_kwargs)


def count_params(model: nn.Module, convention: str = "official") -> int:
    """Number of parameters.

    ``"module"`` counts this module's parameters. ``"official"`` counts the entries of Meta's
    released state_dict: for the DINOv3-style ViTs that adds the key bias, which is masked to zero
    (timm keeps it as a zero buffer), and the pretraining-only mask token (timm drops it).
    """
    if convention not in ("module", "official"):
        raise ValueError(f"convention must be 'module' or 'official', got {convention!r}")
    n = sum(p.numel() for p in model.parameters())
    if convention == "official" and isinstance(model, Encoder) and model.family == "vit":
        n += sum(b.numel() for name, b in model.backbone.named_buffers() if name.endswith("k_bias"))
        n += model.embed_dim  # mask_token
    return n
