"""Tiny benchmark datasets in the exact on-disk layouts, with answers known by construction.

The generators are imported by the other eval tests; the tests here check that each reader
parses its real format (including the quirks: BTS paths starting with '/', SPair file names with
':', ADE's reduce_zero_label).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eupe.eval.datasets import ADE20k, NYUDepth, SPair, class_folder_splits
from eupe.models import EncoderOutput
from eupe.teachers.base import Teacher

PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]], np.uint8
)


def tiny_encoder(seed: int = 0, depth: int = 2):
    """A random 2-block ViT-T/16: the real architecture, cheap enough for a 2-core test run."""
    import eupe

    torch.manual_seed(seed)
    return eupe.create_model("eupe_vitt16", depth=depth).eval()


class ColorEncoder(Teacher):
    """A transparent encoder: each 16x16 block's mean colour, through a fixed nonlinear lift.

    Its features are exactly as informative as the colours, so on colour-coded data every
    protocol has a known answer (near-perfect), unlike a random ViT whose cls ignores content.
    """

    def __init__(self, dim: int = 16):
        super().__init__(resolution=224, stride=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        g = torch.Generator().manual_seed(0)
        self.register_buffer("lift", torch.randn(3, dim, generator=g))
        self.cls_dim = self.patch_dim = dim

    def encode(self, images: torch.Tensor) -> EncoderOutput:
        fmap = F.avg_pool2d(images, self.stride)
        tokens = torch.tanh(fmap.flatten(2).transpose(1, 2) @ self.lift)
        return EncoderOutput(cls=tokens.mean(1), patches=tokens, registers=None, grid=tuple(fmap.shape[-2:]))


def save_tiny_encoder(path: Path, seed: int = 0) -> Path:
    tiny_encoder(seed).save_pretrained(str(path))
    return path


def make_class_folders(
    root: Path, classes: int, per_class: int, size: int = 32, shuffle_train: bool = False, seed: int = 0
) -> Path:
    """ImageNet layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG; class k is colour PALETTE[k] + noise.

    shuffle_train moves train images to random class folders: labels then carry no information.
    """
    rng = np.random.default_rng(seed)
    wnids = [f"n{1000 + k:08d}" for k in range(classes)]
    for split in ("train", "val"):
        for k, wnid in enumerate(wnids):
            for i in range(per_class):
                folder = wnids[rng.integers(classes)] if (split == "train" and shuffle_train) else wnid
                img = PALETTE[k % len(PALETTE)] * (0.6 + 0.4 * (k // len(PALETTE))) + rng.normal(
                    0, 12, (size, size, 3)
                )
                out = root / split / folder
                out.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
                    out / f"{wnid}_{split}_{i:04d}.JPEG", quality=95
                )
    return root


def _block_scene(rng: np.random.Generator, h: int, w: int, block: int, classes: int) -> np.ndarray:
    grid = rng.integers(0, classes, (h // block, w // block))
    return np.kron(grid, np.ones((block, block), np.int64))


def make_ade20k(
    root: Path, n_train: int = 6, n_val: int = 2, size: int = 64, classes: int = 4, seed: int = 0
) -> Path:
    """ADEChallengeData2016 layout; every 16x16 block has one class, drawn in that class's colour.

    Label PNG values are class + 1 (1..classes); a thin stripe of 0 ("other") is ignored.
    """
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cls = _block_scene(rng, size, size, 16, classes)
            img = PALETTE[cls].astype(np.float64) + rng.normal(0, 8, (size, size, 3))
            label = (cls + 1).astype(np.uint8)
            label[:, :2] = 0
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
                base / "images" / split / f"{name}.jpg", quality=95
            )
            Image.fromarray(label).save(base / "annotations" / split / f"{name}.png")
    return base


def make_nyu(root: Path, n_train: int = 6, n_test: int = 2, h: int = 48, w: int = 64, seed: int = 0) -> Path:
    """BTS layout: nyu_train.txt with '/scene/rgb_*.jpg /scene/sync_depth_*.png 518.8579' lines,
    nyu_test.txt with relative paths; depth PNGs uint16 in mm. Depth is a known function of the
    colour: each image is a linear ramp (random direction) from blue (1 m) to orange (6 m).
    """
    rng = np.random.default_rng(seed)
    lines = {"train": [], "test": []}
    yy, xx = np.mgrid[0:h, 0:w]
    ramps = [xx / (w - 1), 1 - xx / (w - 1), yy / (h - 1), 1 - yy / (h - 1)]
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            scene = f"kitchen_{i:04d}{'b' if split == 'train' else ''}"
            folder = root / ("sync" if split == "train" else "official_splits/test") / scene
            folder.mkdir(parents=True, exist_ok=True)
            t = ramps[int(rng.integers(len(ramps)))][..., None]
            img = (1 - t) * PALETTE[3] + t * PALETTE[4] + rng.normal(0, 3, (h, w, 3))
            depth_mm = np.round((1.0 + 5.0 * t[..., 0]) * 1000).astype(np.uint16)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"rgb_{i:05d}.jpg", quality=95)
            Image.fromarray(depth_mm).save(folder / f"sync_depth_{i:05d}.png")
            rel = folder.relative_to(root).as_posix()
            if split == "train":  # real BTS train lists are relative to the data root but start with '/'
                lines[split].append(f"/{rel}/rgb_{i:05d}.jpg /{rel}/sync_depth_{i:05d}.png 518.8579")
            else:
                lines[split].append(f"{rel}/rgb_{i:05d}.jpg {rel}/sync_depth_{i:05d}.png 518.8579")
    (root / "nyu_train.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "nyu_test.txt").write_text("\n".join(lines["test"]) + "\n")
    return root


def make_spair(
    root: Path,
    categories: tuple[str, ...] = ("cat", "dog"),
    pairs: int = 2,
    size: int = 96,
    identical: bool = True,
    seed: int = 0,
) -> Path:
    """SPair-71k layout: PairAnnotation/test/<id>-<src>-<trg>:<category>.json + JPEGImages/<cat>/.

    identical=True makes every target the same (textured) image as its source.
    """
    rng = np.random.default_rng(seed)
    base = root / "SPair-71k"
    ann = base / "PairAnnotation" / "test"
    ann.mkdir(parents=True, exist_ok=True)
    n = 0
    for cat in categories:
        (base / "JPEGImages" / cat).mkdir(parents=True, exist_ok=True)
        for p in range(pairs):
            h, w = size, size * 3 // 4 + 16 * p  # not square, not a multiple of the stride
            img = rng.integers(0, 256, (h // 8, w // 8, 3)).astype(np.uint8)
            img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
            src, trg = f"{2008 + p}_{n:06d}", f"{2009 + p}_{n:06d}"
            Image.fromarray(img).save(base / "JPEGImages" / cat / f"{src}.jpg", quality=98)
            other = img if identical else rng.integers(0, 256, img.shape).astype(np.uint8)
            Image.fromarray(other).save(base / "JPEGImages" / cat / f"{trg}.jpg", quality=98)
            kps = [[float(rng.integers(8, w - 8)), float(rng.integers(8, h - 8))] for _ in range(5)]
            d = {
                "filename": f"{n:06d}-{src}-{trg}:{cat}",
                "src_imname": f"{src}.jpg",
                "trg_imname": f"{trg}.jpg",
                "src_imsize": [w, h, 3],
                "trg_imsize": [w, h, 3],
                "src_bndbox": [0, 0, w - 1, h - 1],
                "trg_bndbox": [0, 0, w - 1, h - 1],
                "category": cat,
                "src_kps": kps,
                "trg_kps": kps,
                "kps_ids": [str(i) for i in range(len(kps))],
                "viewpoint_variation": 0,
            }
            (ann / f"{n:06d}-{src}-{trg}:{cat}.json").write_text(json.dumps(d))
            n += 1
    return base


# --- readers on the generated layouts ------------------------------------------------------------
def test_class_folder_reader(tmp_path):
    make_class_folders(tmp_path, classes=3, per_class=2)
    train, val = class_folder_splits(tmp_path)
    assert train.classes == val.classes == ["n00001000", "n00001001", "n00001002"]
    assert len(train) == len(val) == 6
    image, label = val[5]
    assert image.size == (32, 32) and label == 2


def test_ade20k_reader_reduces_zero_label(tmp_path):
    make_ade20k(tmp_path, n_train=1, n_val=1)
    ds = ADE20k(tmp_path, "validation")  # also finds the ADEChallengeData2016 subfolder
    image, label = ds[0]
    assert image.shape == (64, 64, 3) and label.shape == (64, 64)
    assert (label[:, :2] == 255).all()  # 0 ("other") becomes the ignore index
    assert set(np.unique(label[:, 2:])) <= {0, 1, 2, 3}


def test_nyu_reader_bts_lists(tmp_path):
    make_nyu(tmp_path, n_train=2, n_test=1)
    assert (tmp_path / "nyu_train.txt").read_text().startswith("/sync/")
    train = NYUDepth(tmp_path, "nyu_train.txt")
    image, depth = train[1]
    assert image.shape == (48, 64, 3) and depth.dtype == np.float32
    assert depth.min() == pytest.approx(1.0) and depth.max() == pytest.approx(6.0)  # mm -> metres
    assert train.samples[0].focal == pytest.approx(518.8579)


def test_spair_reader(tmp_path):
    make_spair(tmp_path, categories=("cat", "dog", "bus"), pairs=3)
    ds = SPair(tmp_path, pairs_per_category=2)
    assert len(ds) == 6 and sorted({p.category for p in ds.pairs}) == ["bus", "cat", "dog"]
    assert ds[0].src_kps.shape == (5, 2) and ds[0].src.is_file()
