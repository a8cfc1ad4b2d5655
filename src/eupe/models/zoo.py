"""The EUPE model zoo: each name maps to a timm architecture plus the overrides that make it EUPE."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ZooSpec:
    """What a zoo name means: the timm architecture and the facts `eupe models` prints."""

    name: str
    timm_name: str
    family: str  # "vit" or "convnext"
    stride: int
    embed_dim: int
    num_registers: int
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    official_params: int | None = None  # count of Meta's released state_dict, where known exactly
    description: str = ""


# timm's `vit_*_patch16_dinov3_qkvb` and `convnext_*` are the official EUPE architectures
# (LayerNorm eps 1e-5, 4 storage tokens, DINOv3 RoPE, masked key bias).
_SPECS = [
    ZooSpec(
        "eupe_vitt16",
        "vit_tiny_patch16_dinov3_qkvb",
        "vit",
        16,
        192,
        4,
        official_params=5_492_160,
        description="EUPE ViT-T/16 student",
    ),
    # Not an EUPE release size: the demo's student, 10-20x smaller than its experts as the paper's
    # students are than theirs (timm's ViT-T/16 layout, narrower and shallower).
    ZooSpec(
        "eupe_vitp16",
        "vit_tiny_patch16_dinov3_qkvb",
        "vit",
        16,
        64,
        4,
        timm_kwargs=dict(embed_dim=64, depth=4, num_heads=2),
        description="ViT-Pico/16 (64 wide, 4 deep): the demo's student",
    ),
    ZooSpec(
        "eupe_vits16",
        "vit_small_patch16_dinov3_qkvb",
        "vit",
        16,
        384,
        4,
        official_params=21_601_152,
        description="EUPE ViT-S/16 student",
    ),
    ZooSpec(
        "eupe_vitb16", "vit_base_patch16_dinov3_qkvb", "vit", 16, 768, 4, description="EUPE ViT-B/16 student"
    ),
    ZooSpec(
        "eupe_convnext_tiny",
        "convnext_tiny",
        "convnext",
        32,
        768,
        0,
        official_params=27_820_128,
        description="EUPE ConvNeXt-T student",
    ),
    ZooSpec(
        "eupe_convnext_small", "convnext_small", "convnext", 32, 768, 0, description="EUPE ConvNeXt-S student"
    ),
    ZooSpec(
        "eupe_convnext_base", "convnext_base", "convnext", 32, 1024, 0, description="EUPE ConvNeXt-B student"
    ),
    ZooSpec(
        "eupe_vitl16",
        "vit_large_patch16_dinov3_qkvb",
        "vit",
        16,
        1024,
        4,
        description="ViT-L/16, a mid-size proxy",
    ),
    ZooSpec(
        "eupe_vith16plus",
        "vit_huge_plus_patch16_dinov3_qkvb",
        "vit",
        16,
        1280,
        4,
        description="ViT-H+/16, a large proxy (DINOv3-H+ shape)",
    ),
    # The Stage-1 proxy: PEcore-G-like width/depth/MLP, DINOv3-style RoPE and 4 registers.
    ZooSpec(
        "eupe_proxy_g16",
        "vit_large_patch16_dinov3_qkvb",
        "vit",
        16,
        1536,
        4,
        timm_kwargs=dict(embed_dim=1536, depth=50, num_heads=16, mlp_ratio=8960 / 1536),
        description="~1.9B ViT-G/16 proxy teacher (Stage 1)",
    ),
]

ZOO: dict[str, ZooSpec] = {s.name: s for s in _SPECS}
STUDENTS = (
    "eupe_vitt16",
    "eupe_vits16",
    "eupe_vitb16",
    "eupe_convnext_tiny",
    "eupe_convnext_small",
    "eupe_convnext_base",
)


def get_spec(name: str) -> ZooSpec:
    if name not in ZOO:
        raise KeyError(f"unknown model '{name}'; the zoo has: {', '.join(ZOO)}")
    return ZOO[name]
