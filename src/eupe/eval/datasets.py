"""Readers for the benchmark datasets in their real on-disk layouts.

- class-per-folder trees (ImageNet `train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`, or any such tree)
- ADE20k `ADEChallengeData2016/images/{training,validation}/*.jpg` + `annotations/.../*.png`
- NYUv2 in the BTS split layout: `nyu_train.txt` / `nyu_test.txt` with "rgb depth focal" lines,
  paths relative to the data root (possibly starting with '/'), depth PNGs in millimetres
- SPair-71k `PairAnnotation/test/*.json` + `JPEGImages/<category>/<name>.jpg`
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


def _require_dir(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        raise ConfigError(f"{path}: no such folder ({what}); {fix}")
    return path


def load_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


# --- class-per-folder ----------------------------------------------------------------------------
class ClassFolder:
    """Images in `<root>/<class>/*`; class indices follow `classes` (default: sorted folder names)."""

    def __init__(self, root: str | Path, classes: list[str] | None = None):
        self.root = _require_dir(Path(root), "class-per-folder tree", "point --data at the dataset root")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not found:
            raise ConfigError(f"{self.root}: no class folders inside (expected <root>/<class>/<image>)")
        self.classes = list(classes) if classes is not None else found
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for c in found:
            if c not in index:
                raise ConfigError(f"{self.root / c}: class '{c}' is not among the training classes")
            for f in sorted((self.root / c).iterdir()):
                if f.suffix.lower() in IMAGE_EXTS:
                    self.samples.append((f, index[c]))
        if not self.samples:
            raise ConfigError(f"{self.root}: class folders hold no images ({', '.join(sorted(IMAGE_EXTS))})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return load_rgb(path), label


def class_folder_splits(
    root: str | Path, train: str = "train", val: str = "val"
) -> tuple[ClassFolder, ClassFolder]:
    """The train and val trees under `root` (ImageNet layout); class order from the train split."""
    root = Path(root)
    _require_dir(root / train, "train split", f"expected {root}/{train}/<class>/<image> (ImageNet layout)")
    _require_dir(root / val, "val split", f"expected {root}/{val}/<class>/<image> (ImageNet layout)")
    tr = ClassFolder(root / train)
    return tr, ClassFolder(root / val, classes=tr.classes)


# --- ADE20k --------------------------------------------------------------------------------------
class ADE20k:
    """ADEChallengeData2016: uint8 label PNGs where 0 is "other" and 1..150 are classes.

    Returns (image HxWx3 uint8, label HxW int64) with `reduce_zero_label` applied: 0 -> 255
    (ignored), k -> k-1.
    """

    num_classes = 150
    ignore_index = 255

    def __init__(self, root: str | Path, split: str = "training"):
        root = Path(root)
        if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        images = _require_dir(
            root / "images" / split, "ADE20k images", "expected <root>/images/{training,validation}/*.jpg"
        )
        annotations = _require_dir(
            root / "annotations" / split, "ADE20k labels", "expected <root>/annotations/<split>/*.png"
        )
        self.samples = []
        for img in sorted(images.iterdir()):
            if img.suffix.lower() in IMAGE_EXTS:
                ann = annotations / (img.stem + ".png")
                if not ann.is_file():
                    raise ConfigError(f"{img}: no label {ann}")
                self.samples.append((img, ann))
        if not self.samples:
            raise ConfigError(f"{images}: no images")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img, ann = self.samples[i]
        image = np.asarray(load_rgb(img))
        with Image.open(ann) as im:
            label = np.asarray(im).astype(np.int64)
        return image, reduce_zero_label(label)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    out = label - 1
    out[label == 0] = 255
    return out


# --- NYUv2 (BTS lists) ---------------------------------------------------------------------------
@dataclass
class NYUSample:
    rgb: Path
    depth: Path
    focal: float


class NYUDepth:
    """NYUv2 samples from a BTS list file; depth PNGs are uint16 millimetres, returned in metres."""

    def __init__(self, root: str | Path, list_file: str | Path):
        self.root = _require_dir(
            Path(root), "NYU data root", "point --data at the folder the list is relative to"
        )
        lst = Path(list_file)
        if not lst.is_absolute() and not lst.is_file():
            lst = self.root / lst
        if not lst.is_file():
            raise ConfigError(f"{lst}: no such list file (BTS layout: 'rgb depth focal' per line)")
        self.samples: list[NYUSample] = []
        for n, line in enumerate(lst.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ConfigError(f"{lst}:{n}: expected 'rgb depth focal', got {line!r}")
            if parts[1] == "None":
                continue  # BTS lists mark frames without ground truth this way
            focal = float(parts[2]) if len(parts) > 2 else float("nan")
            self.samples.append(NYUSample(self._path(parts[0]), self._path(parts[1]), focal))
        if not self.samples:
            raise ConfigError(f"{lst}: no samples")

    def _path(self, p: str) -> Path:
        return self.root / p.lstrip("/")  # real BTS train lists start paths with '/'

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples[i]
        for p in (s.rgb, s.depth):
            if not p.is_file():
                raise ConfigError(f"{p}: listed file is missing (list paths are relative to --data)")
        image = np.asarray(load_rgb(s.rgb))
        with Image.open(s.depth) as im:
            depth = np.asarray(im).astype(np.float32) / 1000.0
        return image, depth


# --- SPair-71k -----------------------------------------------------------------------------------
@dataclass
class SPairPair:
    category: str
    src: Path
    trg: Path
    src_kps: np.ndarray  # [K, 2] (x, y) pixels in the original source image
    trg_kps: np.ndarray
    trg_bbox: np.ndarray  # [4] x1, y1, x2, y2


class SPair:
    """SPair-71k pairs of one split, the first `pairs_per_category` per category (sorted by file)."""

    def __init__(self, root: str | Path, split: str = "test", pairs_per_category: int | None = 100):
        root = Path(root)
        if not (root / "PairAnnotation").is_dir() and (root / "SPair-71k").is_dir():
            root = root / "SPair-71k"
        ann = _require_dir(
            root / "PairAnnotation" / split, "SPair annotations", "expected <root>/PairAnnotation/test/*.json"
        )
        per_cat: dict[str, list[SPairPair]] = defaultdict(list)
        for f in sorted(ann.glob("*.json")):
            d = json.loads(f.read_text())
            cat = d["category"]
            if pairs_per_category is not None and len(per_cat[cat]) >= pairs_per_category:
                continue
            src_kps = np.asarray(d["src_kps"], dtype=np.float64).reshape(-1, 2)
            trg_kps = np.asarray(d["trg_kps"], dtype=np.float64).reshape(-1, 2)
            if len(src_kps) != len(trg_kps):
                raise ConfigError(f"{f}: {len(src_kps)} source but {len(trg_kps)} target keypoints")
            per_cat[cat].append(
                SPairPair(
                    cat,
                    root / "JPEGImages" / cat / d["src_imname"],
                    root / "JPEGImages" / cat / d["trg_imname"],
                    src_kps,
                    trg_kps,
                    np.asarray(d["trg_bndbox"], dtype=np.float64),
                )
            )
        self.pairs = [p for cat in sorted(per_cat) for p in per_cat[cat]]
        if not self.pairs:
            raise ConfigError(f"{ann}: no pair annotations")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> SPairPair:
        return self.pairs[i]
