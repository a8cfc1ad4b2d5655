"""`DataConfig`: where images come from, how batches mix them, and how views are augmented.

OmegaConf structured dataclasses (the `data.*` block of a distill config), so every value can be
overridden on the command line, e.g. `data.curated_prob=0.2 data.augment.solarize_p=0`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

SOURCE_TYPES = ("folder", "filelist", "tar", "synthetic", "views")


@dataclass
class SourceSpec:
    """One image source.

    type: "folder" (recursive image folder; class subfolders optional), "filelist" (a text file,
        one image path per line, relative to the list's folder), "tar" (webdataset-style shards:
        a .tar file, a folder of .tar files, or a glob), "synthetic" (generated from the seed),
        "views" (ready-made views: a safetensors file with a uint8 `views` tensor [N,3,H,W]).
    curated: batches drawn with probability `DataConfig.curated_prob` come only from curated
        sources (the paper's ImageNet share); all other batches come from the non-curated pool.
    size / image_size: number and side of synthetic images (ignored by other types).
    """

    name: str = "synthetic"
    type: str = "synthetic"
    path: str = ""
    size: int = 256
    image_size: int = 96
    curated: bool = False


@dataclass
class AugmentConfig:
    """The augmentations the paper names for Stages 2/3 (section 4.1), each with a probability.

    The view is a random resized crop (area fraction `crop_scale`, aspect `crop_ratio`) resized to
    the view size, then horizontal flip, color jitter (factors drawn uniformly, ops in random
    order), Gaussian blur (sigma in `blur_sigma`) and solarization (pixels >= threshold inverted).
    The paper lists these operations but gives no parameters: the values below are our choice,
    taken from DINOv2/v3's global-crop augmentations (docs/fidelity.md says which and why).
    """

    crop_scale: tuple[float, float] = (0.32, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    solarize_threshold: float = 0.5


@dataclass
class DataConfig:
    """Sources, batch mixing and augmentation for distillation.

    curated_prob: probability that a whole (global) batch comes from the curated sources
        (paper section 3.4: 10% ImageNet); ignored when no source is curated.
    index: a folder written by `eupe data index` covering the tar/folder/filelist sources (16 bytes
        per image, memory-mapped by every rank and worker); None scans them at start-up instead.
    num_workers: DataLoader worker processes for decoding + cropping (0: in the main process).
        Results do not depend on it. `persistent_workers` and `prefetch_factor` (batches in
        flight per worker) are passed to the DataLoader.
    decode_min_side: "auto" (default) lets large JPEGs decode at 1/2, 1/4 or 1/8 scale while both
        sides stay >= view side / sqrt(augment.crop_scale[0]) (so even the smallest crop is not
        upsampled); an int sets that side (0 decodes at full size). Recorded in each view's params.
    device_augment: colour jitter, blur and solarize run batched on the training device from each
        view's recorded parameters, and batches travel as uint8 (pinned); None (default) = on when
        the device is CUDA. False runs them per view in the workers (float32 batches).
    teacher_cache: a teacher-feature cache folder to read targets from instead of running teachers
        (see `eupe cache-teacher`); None runs the teachers live.
    """

    sources: list[SourceSpec] = field(default_factory=lambda: [SourceSpec()])
    curated_prob: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    index: str | None = None
    num_workers: int = 0
    persistent_workers: bool = True
    prefetch_factor: int = 4
    decode_min_side: Any = "auto"
    device_augment: bool | None = None
    teacher_cache: str | None = None


def _check_range(pair: tuple[float, float], name: str, lo: float, hi: float) -> None:
    a, b = float(pair[0]), float(pair[1])
    if not (lo <= a <= b <= hi):
        raise ConfigError(f"{name} must be an ordered pair within [{lo}, {hi}]; got ({a}, {b})")


def validate_data(cfg: DataConfig) -> None:
    """Raise ConfigError naming the first bad `data.*` field (no files are read here)."""
    if not cfg.sources:
        raise ConfigError("data.sources is empty; add one, e.g. {name: imgs, type: folder, path: DIR}")
    names = [s.name for s in cfg.sources]
    for i, s in enumerate(cfg.sources):
        key = f"data.sources[{i}]"
        if s.type not in SOURCE_TYPES:
            raise ConfigError(f"{key}.type={s.type!r} is not one of {', '.join(SOURCE_TYPES)}")
        if s.type == "synthetic":
            if s.size <= 0 or s.image_size < 8:
                raise ConfigError(
                    f"{key}: synthetic needs size > 0 and image_size >= 8; got {s.size}, {s.image_size}"
                )
        elif not s.path:
            raise ConfigError(f"{key}.path is empty; a {s.type} source needs a path")
        if names.count(s.name) > 1:
            raise ConfigError(f"{key}.name={s.name!r} is used by more than one source; names must be unique")
    if not 0.0 <= cfg.curated_prob <= 1.0:
        raise ConfigError(f"data.curated_prob must be in [0, 1]; got {cfg.curated_prob}")
    d = cfg.decode_min_side
    if d != "auto" and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
        raise ConfigError(
            f"data.decode_min_side must be 'auto' or an int >= 0 (0 = full-size decode); got {d!r}"
        )
    if cfg.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0; got {cfg.num_workers}")
    if cfg.prefetch_factor < 1:
        raise ConfigError(f"data.prefetch_factor must be >= 1; got {cfg.prefetch_factor}")
    a = cfg.augment
    _check_range(a.crop_scale, "data.augment.crop_scale", 1e-4, 1.0)
    _check_range(a.crop_ratio, "data.augment.crop_ratio", 1e-3, 1e3)
    _check_range(a.blur_sigma, "data.augment.blur_sigma", 1e-3, 100.0)
    for name in ("flip_p", "jitter_p", "blur_p", "solarize_p", "solarize_threshold"):
        v = getattr(a, name)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"data.augment.{name} must be in [0, 1]; got {v}")
    for name in ("brightness", "contrast", "saturation"):
        if getattr(a, name) < 0:
            raise ConfigError(f"data.augment.{name} must be >= 0; got {getattr(a, name)}")
    if not 0.0 <= a.hue <= 0.5:
        raise ConfigError(f"data.augment.hue must be in [0, 0.5]; got {a.hue}")


def decode_side(cfg: DataConfig, view_size: int) -> int:
    """The `min_side` JPEGs are decoded at for views of `view_size` (see `decode_min_side`)."""
    if cfg.decode_min_side == "auto":
        return math.ceil(view_size / math.sqrt(float(cfg.augment.crop_scale[0])))
    return int(cfg.decode_min_side)
