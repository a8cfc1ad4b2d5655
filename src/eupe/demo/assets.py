"""The committed demo dataset (src/eupe/demo/data/): manifest, images and deterministic splits.

Built once from Debian/PyPI packages by scripts/build_demo_data.py, so the demo itself needs no
apt install and no download. Splits are by `group` (an image and its mirrored copy share a group),
so no held-out image has a near-duplicate in the training pool.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ConfigError

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Asset:
    """One manifest entry: `file` relative to the data folder, `label` for cut-outs only."""

    file: str
    kind: str  # "stamp" | "photo" | "graf" | "graf_h" | "font"
    label: str | None
    group: str
    package: str
    original: str
    license: str
    sha256: str
    has_text: bool = False

    def path(self, root: Path = DATA_DIR) -> Path:
        return root / self.file


@dataclass(frozen=True)
class DemoSplits:
    """pool_*: material for the unlabeled training pool; the rest is held out for evaluation."""

    pool_stamps: tuple[Asset, ...]
    knn_stamps: tuple[Asset, ...]  # held-out labeled cut-outs of the kNN classes
    knn_classes: tuple[str, ...]
    pool_photos: tuple[Asset, ...]
    heldout_photos: tuple[Asset, ...]  # text-free photos for the text and homography benchmarks


def load_manifest(root: Path = DATA_DIR) -> dict[str, Any]:
    path = root / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found; rebuild it with scripts/build_demo_data.py or reinstall eupe")
    return json.loads(path.read_text())


@cache
def load_assets(root: Path = DATA_DIR) -> tuple[Asset, ...]:
    fields = set(Asset.__dataclass_fields__)
    return tuple(Asset(**{k: v for k, v in e.items() if k in fields}) for e in load_manifest(root)["images"])


def _by_kind(assets: tuple[Asset, ...], kind: str) -> list[Asset]:
    return [a for a in assets if a.kind == kind]


def _shuffled(items: list[str], seed: int, salt: str) -> list[str]:
    """Order by a hash of (seed, salt, item): stable across Python versions and platforms."""
    return sorted(items, key=lambda s: hashlib.sha256(f"{seed}/{salt}/{s}".encode()).hexdigest())


def make_splits(
    seed: int = 0,
    knn_fraction: float = 0.5,
    min_class_size: int = 12,
    heldout_photos: int = 16,
    root: Path = DATA_DIR,
) -> DemoSplits:
    """Deterministic split of cut-outs and photos.

    kNN classes are the Tux Paint categories with at least `min_class_size` cut-outs (17 classes at
    12). Per class, `knn_fraction` of its groups are held out for the kNN benchmark; the rest, plus
    every cut-out of the smaller categories, goes to the training pool. `heldout_photos` text-free
    photos are held out for the text-segmentation and homography benchmarks.
    """
    if not 0.0 < knn_fraction < 1.0:
        raise ConfigError(f"knn_fraction must be in (0, 1), got {knn_fraction}")
    assets = load_assets(root)
    stamps = _by_kind(assets, "stamp")
    sizes: dict[str, int] = {}
    for a in stamps:
        sizes[a.label or ""] = sizes.get(a.label or "", 0) + 1
    classes = tuple(sorted(c for c, n in sizes.items() if n >= min_class_size))
    if len(classes) < 2:
        raise ConfigError(f"min_class_size={min_class_size} leaves {len(classes)} kNN classes; lower it")
    held: set[str] = set()
    for c in classes:
        groups = sorted({a.group for a in stamps if a.label == c})
        k = max(1, round(knn_fraction * len(groups)))
        held.update(_shuffled(groups, seed, f"knn/{c}")[:k])
    knn = tuple(a for a in stamps if a.group in held)
    pool = tuple(a for a in stamps if a.group not in held)

    photos = _by_kind(assets, "photo")
    clean = [a.group for a in photos if not a.has_text]
    if not 0 < heldout_photos < len(clean):
        raise ConfigError(f"heldout_photos must be in 1..{len(clean) - 1}, got {heldout_photos}")
    held_ph = set(_shuffled(clean, seed, "photos")[:heldout_photos])
    return DemoSplits(
        pool_stamps=pool,
        knn_stamps=knn,
        knn_classes=classes,
        pool_photos=tuple(a for a in photos if a.group not in held_ph),
        heldout_photos=tuple(a for a in photos if a.group in held_ph),
    )


@cache
def _read(path: Path, mode: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert(mode))


def read_image(asset: Asset, root: Path = DATA_DIR) -> Image.Image:
    """RGBA for cut-outs (alpha kept for compositing), RGB otherwise; cached decoded pixels."""
    mode = "RGBA" if asset.kind == "stamp" else "RGB"
    return Image.fromarray(_read(asset.path(root), mode))


def font_files(root: Path = DATA_DIR) -> list[Path]:
    return [a.path(root) for a in load_assets(root) if a.kind == "font"]


def graf_homography(root: Path = DATA_DIR) -> dict[str, Any]:
    """graf1 -> graf3 ground truth in the stored images' pixel coordinates (see homography.json)."""
    return json.loads((root / "graf" / "homography.json").read_text())
