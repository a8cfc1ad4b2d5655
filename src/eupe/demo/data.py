"""Demo data: an unlabeled training pool and the held-out sets of the three demo benchmarks.

Everything is generated from the committed assets (see `assets.py`) and is a pure function of the
seed. Item i of a set depends only on (seed, set name, i), so `--quick` runs see a prefix of the
full run's data and the sets never share random streams.

- `training_pool`: photo crops (or a plain backdrop) with 0-3 cut-outs composited on them, and
  text rendered onto a share of the images, so both experts have something to see.
- `knn_set`: held-out cut-outs of the kNN classes, centered on white, with their category index.
- `text_set`: held-out text-free photos with rendered text and the exact text mask.
- `homography_set`: held-out photos and random perspective warps of them with the known H;
  `graf_pair`: graf1 -> graf3 with the rescaled ground-truth homography.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .assets import DATA_DIR, Asset, DemoSplits, font_files, graf_homography, read_image
from .text import TextSettings, render_text

_SALTS = {"pool": 1, "knn": 2, "text": 3, "homography": 4}


def item_rng(seed: int, name: str, index: int) -> np.random.Generator:
    """Independent, reproducible stream for item `index` of set `name`."""
    return np.random.default_rng(np.random.SeedSequence([seed, _SALTS[name], index]))


def demo_fonts(root: Path = DATA_DIR) -> list[Path | None]:
    """Committed DejaVu fonts plus Pillow's built-in scalable font (None)."""
    return [*font_files(root), None]


def random_crop(
    photo: Image.Image, size: int, rng: np.random.Generator, min_area: float = 0.3
) -> Image.Image:
    """RandomResizedCrop-style: area fraction in [min_area, 1], aspect in [3/4, 4/3], to size x size."""
    w, h = photo.size
    for _ in range(10):
        area = w * h * rng.uniform(min_area, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        cw = ch = min(w, h)
        x, y = (w - cw) // 2, (h - ch) // 2
    crop = photo.crop((x, y, x + cw, y + ch)).resize((size, size), Image.Resampling.BICUBIC)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def plain_backdrop(size: int, rng: np.random.Generator) -> Image.Image:
    """A flat or two-colour vertical gradient backdrop (cut-outs are also seen off photos)."""
    c0, c1 = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    if rng.random() < 0.5:
        c1 = c0
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    img = (1 - t) * c0 + t * c1
    return Image.fromarray(np.broadcast_to(img, (size, size, 3)).astype(np.uint8))


def paste_stamp(
    canvas: Image.Image, stamp: Image.Image, rng: np.random.Generator, scale: tuple[float, float]
) -> None:
    """Alpha-composite a cut-out, long side = U(scale) x canvas side, mostly inside the canvas."""
    side = canvas.size[0]
    long = max(8, round(side * rng.uniform(*scale)))
    s = long / max(stamp.size)
    st = stamp.resize(
        (max(1, round(stamp.size[0] * s)), max(1, round(stamp.size[1] * s))), Image.Resampling.BICUBIC
    )
    if rng.random() < 0.5:
        st = st.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    sw, sh = st.size
    x = int(rng.integers(-sw // 4, max(1 - sw // 4, side - 3 * sw // 4)))
    y = int(rng.integers(-sh // 4, max(1 - sh // 4, side - 3 * sh // 4)))
    canvas.alpha_composite(st, (max(0, x), max(0, y)), (max(0, -x), max(0, -y)))


@dataclass(frozen=True)
class PoolSettings:
    size: int = 224
    text_fraction: float = 0.4
    plain_fraction: float = 0.2
    max_stamps: int = 3
    stamp_scale: tuple[float, float] = (0.3, 0.8)
    text: TextSettings = TextSettings()


def pool_image(
    splits: DemoSplits, index: int, seed: int, settings: PoolSettings, fonts: list[Path | None]
) -> np.ndarray:
    """Item `index` of the unlabeled training pool as uint8 [size, size, 3]."""
    rng = item_rng(seed, "pool", index)
    size = settings.size
    if rng.random() < settings.plain_fraction:
        canvas = plain_backdrop(size, rng).convert("RGBA")
        n_stamps = int(rng.integers(1, settings.max_stamps + 1))
    else:
        photo = splits.pool_photos[int(rng.integers(0, len(splits.pool_photos)))]
        canvas = random_crop(read_image(photo), size, rng).convert("RGBA")
        n_stamps = int(rng.integers(0, settings.max_stamps + 1))
    for _ in range(n_stamps):
        stamp = splits.pool_stamps[int(rng.integers(0, len(splits.pool_stamps)))]
        paste_stamp(canvas, read_image(stamp), rng, settings.stamp_scale)
    img = np.asarray(canvas.convert("RGB"))
    if rng.random() < settings.text_fraction:
        img, _, _ = render_text(img, rng, fonts, settings.text)
    return img


def training_pool(
    splits: DemoSplits, n: int, seed: int = 0, settings: PoolSettings = PoolSettings(), progress: bool = True
) -> np.ndarray:
    """n unlabeled training images, uint8 [n, size, size, 3]."""
    fonts = demo_fonts()
    out = np.empty((n, settings.size, settings.size, 3), dtype=np.uint8)
    for i in tqdm(range(n), desc="demo pool", disable=not progress, leave=False):
        out[i] = pool_image(splits, i, seed, settings, fonts)
    return out


def make_views(pool: np.ndarray, k: int, size: int, seed: int, progress: bool = True) -> torch.Tensor:
    """K random-resized-crop + flip views of every pool image: uint8 [N*K, 3, size, size].

    View j of image i depends only on (seed, i, j), so a smaller pool's views are a prefix.
    """
    out = torch.empty((len(pool) * k, 3, size, size), dtype=torch.uint8)
    for i in tqdm(range(len(pool)), desc="demo views", disable=not progress, leave=False):
        img = Image.fromarray(pool[i])
        for j in range(k):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 7, i, j]))
            crop = np.asarray(random_crop(img, size, rng, min_area=0.35))
            out[i * k + j] = torch.from_numpy(crop.copy()).permute(2, 0, 1)
    return out


def centered_stamp(stamp: Image.Image, size: int, fill: float = 0.8) -> np.ndarray:
    """A cut-out scaled to `fill` of the frame, centered on white (how the kNN set shows objects)."""
    s = fill * size / max(stamp.size)
    st = stamp.resize(
        (max(1, round(stamp.size[0] * s)), max(1, round(stamp.size[1] * s))), Image.Resampling.BICUBIC
    )
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(st, ((size - st.size[0]) // 2, (size - st.size[1]) // 2))
    return np.asarray(canvas.convert("RGB"))


def knn_set(
    splits: DemoSplits, size: int = 224, stamps: tuple[Asset, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out labeled cut-outs: (uint8 [N,size,size,3], int64 [N] index into `splits.knn_classes`)."""
    stamps = splits.knn_stamps if stamps is None else stamps
    index = {c: i for i, c in enumerate(splits.knn_classes)}
    images = np.stack([centered_stamp(read_image(a), size) for a in stamps])
    labels = np.array([index[a.label or ""] for a in stamps], dtype=np.int64)
    return images, labels


def text_set(
    splits: DemoSplits, n: int, seed: int = 0, size: int = 224, settings: TextSettings = TextSettings()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out photo crops with rendered text.

    Returns (uint8 [n,size,size,3], bool glyph masks [n,size,size], bool line-region masks).
    """
    fonts = demo_fonts()
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=bool)
    regions = np.empty((n, size, size), dtype=bool)
    for i in range(n):
        rng = item_rng(seed, "text", i)
        photo = splits.heldout_photos[int(rng.integers(0, len(splits.heldout_photos)))]
        crop = random_crop(read_image(photo), size, rng, min_area=0.2)
        images[i], masks[i], regions[i] = render_text(crop, rng, fonts, settings)
    return images, masks, regions


# --- homographies ---------------------------------------------------------------------------------
def homography_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 H with dst ~ H @ [src, 1] from 4+ point pairs [K,2] (normalized DLT, least squares)."""
    rows = []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    _, _, vt = np.linalg.svd(np.asarray(rows, dtype=np.float64))
    h = vt[-1].reshape(3, 3)
    return h / h[2, 2]


def apply_homography(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map [K,2] pixel (x, y) points through H."""
    p = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ np.asarray(h, dtype=np.float64).T
    return p[:, :2] / p[:, 2:3]


def warp_image(image: np.ndarray, h: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Warp `image` by H (source pixel -> output pixel); uncovered output pixels are black.

    Pixel centers: the point (x, y) is pixel column x, row y (same convention as `apply_homography`).
    """
    inv = np.linalg.inv(h)
    # PIL samples the source at inv @ (x + 0.5, y + 0.5) in its continuous coordinates.
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    m = shift @ inv @ np.linalg.inv(shift)
    m = m / m[2, 2]
    img = Image.fromarray(image).transform(
        out_size, Image.Transform.PERSPECTIVE, tuple(m.ravel()[:8]), Image.Resampling.BICUBIC
    )
    return np.asarray(img)


def random_homography(size: int, rng: np.random.Generator, strength: float = 0.15) -> np.ndarray:
    """Jitter the 4 corners by up to strength x size, plus a small rotation and scale about the center."""
    corners = np.array([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], dtype=np.float64)
    c = (size - 1) / 2
    angle = np.deg2rad(rng.uniform(-15, 15))
    scale = rng.uniform(0.85, 1.15)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = (corners - c) @ rot.T + c + rng.uniform(-strength, strength, size=(4, 2)) * size
    return homography_from_points(corners, moved)


def homography_set(
    splits: DemoSplits, n: int, seed: int = 0, size: int = 224, strength: float = 0.15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src uint8 [n,size,size,3], warped uint8 [n,size,size,3], H float64 [n,3,3] src -> warped)."""
    src = np.empty((n, size, size, 3), dtype=np.uint8)
    dst = np.empty_like(src)
    hs = np.empty((n, 3, 3), dtype=np.float64)
    for i in range(n):
        rng = item_rng(seed, "homography", i)
        photo = splits.heldout_photos[int(rng.integers(0, len(splits.heldout_photos)))]
        src[i] = np.asarray(random_crop(read_image(photo), size, rng, min_area=0.4))
        hs[i] = random_homography(size, rng, strength)
        dst[i] = warp_image(src[i], hs[i], (size, size))
    return src, dst, hs


def correspondences(
    h: np.ndarray, size: tuple[int, int], out_size: tuple[int, int], step: int = 16, margin: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Grid points (patch centers every `step` px) of the source that land inside the target.

    Returns (src [K,2], dst [K,2]) pixel coordinates; `margin` px are kept clear of the target edge.
    """
    w, hgt = size
    xs, ys = np.meshgrid(np.arange(step / 2, w, step), np.arange(step / 2, hgt, step))
    pts = np.stack([xs.ravel(), ys.ravel()], axis=1)
    mapped = apply_homography(h, pts)
    ow, oh = out_size
    keep = (mapped[:, 0] >= margin) & (mapped[:, 0] <= ow - 1 - margin)
    keep &= (mapped[:, 1] >= margin) & (mapped[:, 1] <= oh - 1 - margin)
    return pts[keep], mapped[keep]


def graf_pair(
    width: int = 320, height: int = 256, root: Path = DATA_DIR
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """graf1, graf3 resized to width x height and H1to3 rescaled to those pixels."""
    info = graf_homography(root)
    images = []
    for name in ("graf1", "graf3"):
        with Image.open(root / "graf" / f"{name}.png") as im:
            images.append(np.asarray(im.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)))
    out = []
    for name in ("graf1", "graf3"):
        w0, h0 = info["size"][name]
        sx, sy = width / w0, height / h0  # pixel centers at integers: x' = s (x + 0.5) - 0.5
        out.append(np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]]))
    h = out[1] @ np.asarray(info["H1to3"]) @ np.linalg.inv(out[0])
    return images[0], images[1], h / h[2, 2]
