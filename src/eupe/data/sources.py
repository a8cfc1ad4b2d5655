"""Image sources: an indexed, sorted list of items each source can decode on demand.

Indexing only lists names (folder walk, list file, tar headers), so it is cheap and the same on
every rank; decoding happens in the loader's workers. A file that does not decode (corrupt,
truncated, not an image) raises `BadImage`, which the loader counts and replaces; it never ends a
run.
"""

from __future__ import annotations

import glob
import io
import math
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .config import SourceSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
# Refuse decompression bombs loudly but per-file: PIL raises DecompressionBombError above this.
Image.MAX_IMAGE_PIXELS = 200_000_000


class BadImage(Exception):
    """One item could not be decoded into an RGB image (the reason is the message)."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(data: bytes | str | os.PathLike, what: str, min_side: int = 0) -> Image.Image:
    """Decode fully into RGB (a truncated file fails here, not later inside augmentation).

    `min_side` > 0 lets JPEGs decode at a reduced DCT scale (1/2, 1/4, 1/8) as long as both sides
    stay >= min_side: several times faster for large photos, and deterministic per file.
    """
    try:
        with Image.open(data if isinstance(data, (str, os.PathLike)) else io.BytesIO(data)) as img:
            if min_side > 0 and img.format == "JPEG":
                scale = min_side / max(1, min(img.size))
                if scale < 1:
                    img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
            img.load()
            rgb = img.convert("RGB")
    except Exception as e:  # PIL raises many types on damaged files (OSError, SyntaxError, struct.error...)
        raise BadImage(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if rgb.width < 2 or rgb.height < 2:
        raise BadImage(f"{what}: image too small ({rgb.width}x{rgb.height})")
    return rgb


class Source:
    """Base: `keys[i]` names item i (stable across runs); `load(i)` decodes it."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.min_side = 0  # see decode_image; set by open_source

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def keys(self) -> list[str]:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError


class FolderSource(Source):
    """Every image file under `path`, recursively, sorted by relative path."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        root = Path(spec.path)
        if not root.is_dir():
            raise ConfigError(f"data source {spec.name!r}: folder {spec.path!r} does not exist")
        self.root = root
        found = []
        seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:  # a symlink cycle (or a second link to the same folder): walk it once
                dirnames.clear()
                continue
            seen.add(real)
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            found += [os.path.normpath(os.path.join(rel, f)) for f in filenames if _is_image(f)]
        self._keys = sorted(found)

    @property
    def keys(self) -> list[str]:
        return self._keys

    def load(self, index: int) -> Image.Image:
        return decode_image(
            self.root / self._keys[index], f"{self.spec.name}:{self._keys[index]}", self.min_side
        )


class FileListSource(Source):
    """A text file with one image path per line (relative to the list's folder; '#' comments)."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        path = Path(spec.path)
        if not path.is_file():
            raise ConfigError(f"data source {spec.name!r}: file list {spec.path!r} does not exist")
        self.root = path.parent
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        self._keys = [ln for ln in lines if ln and not ln.startswith("#")]

    @property
    def keys(self) -> list[str]:
        return self._keys

    def load(self, index: int) -> Image.Image:
        key = self._keys[index]
        file = Path(key) if os.path.isabs(key) else self.root / key
        if not file.is_file():
            raise BadImage(f"{self.spec.name}:{key}: no such file")
        return decode_image(file, f"{self.spec.name}:{key}", self.min_side)


class TarSource(Source):
    """Webdataset-style shards: image members of uncompressed .tar files, read by offset.

    `path` is a .tar file, a folder of .tar files, or a glob. Member offsets are read once from
    the headers, so a worker reads one member with a seek instead of scanning the shard.
    """

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        p = spec.path
        shards = sorted(glob.glob(os.path.join(p, "*.tar"))) if os.path.isdir(p) else sorted(glob.glob(p))
        if not shards:
            raise ConfigError(
                f"data source {spec.name!r}: no .tar shards at {p!r} (a .tar, a folder or a glob)"
            )
        self.shards = shards
        self._keys: list[str] = []
        self._where: list[tuple[int, int, int]] = []  # (shard, data offset, size)
        for s, shard in enumerate(shards):
            try:
                with tarfile.open(shard, mode="r:") as tar:
                    for m in tar:
                        if m.isfile() and _is_image(m.name):
                            self._keys.append(f"{os.path.basename(shard)}/{m.name}")
                            self._where.append((s, m.offset_data, m.size))
            except (tarfile.TarError, EOFError, OSError) as e:
                # A damaged shard keeps the members indexed before the damage; the rest are lost.
                kept = sum(1 for w in self._where if w[0] == s)
                warnings.warn(
                    f"data source {spec.name!r}: shard {shard} is damaged; using the {kept} members "
                    f"before the damage ({e})",
                    stacklevel=2,
                )

    @property
    def keys(self) -> list[str]:
        return self._keys

    def load(self, index: int) -> Image.Image:
        s, offset, size = self._where[index]
        with open(self.shards[s], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise BadImage(f"{self.spec.name}:{self._keys[index]}: shard ends inside the member")
        return decode_image(data, f"{self.spec.name}:{self._keys[index]}", self.min_side)


class SyntheticSource(Source):
    """Deterministic generated images (gradients, shapes, noise) from (seed, index): no files."""

    def __init__(self, spec: SourceSpec, seed: int = 0):
        super().__init__(spec)
        self.seed = seed
        self._keys = [f"synthetic/{i:08d}" for i in range(spec.size)]

    @property
    def keys(self) -> list[str]:
        return self._keys

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(synthetic_image(self.seed, index, self.spec.image_size))


class ViewsSource(Source):
    """A fixed set of ready-made views: a safetensors file whose `views` tensor is uint8 [N,3,H,W].

    For runs whose targets were computed once for exactly these views (`PrecomputedTargets`, the
    demo); pair it with an augmentation that keeps the view whole (crop_scale [1, 1], no flips).
    """

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        from safetensors import safe_open

        try:
            with safe_open(spec.path, "pt") as f:
                shape = f.get_slice("views").get_shape()
        except Exception as e:
            raise ConfigError(
                f"data source {spec.name!r}: {spec.path!r} is not a safetensors file with a `views` "
                f"tensor ({type(e).__name__})"
            ) from None
        self._keys = [f"view/{i:07d}" for i in range(int(shape[0]))]
        self._views = None

    @property
    def keys(self) -> list[str]:
        return self._keys

    def load(self, index: int) -> Image.Image:
        if self._views is None:  # opened lazily: once per DataLoader worker, memory-mapped
            from safetensors import safe_open

            self._views = safe_open(self.spec.path, "pt")
        view = self._views.get_slice("views")[index]
        return Image.fromarray(view.permute(1, 2, 0).contiguous().numpy())


def synthetic_image(seed: int, index: int, size: int) -> np.ndarray:
    """A [size, size, 3] uint8 image: a colour gradient, a few rectangles/ellipses, light noise."""
    rng = np.random.default_rng([seed, index, 0x5EED])
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    yy, xx = axis[:, None], axis[None, :]
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.float32(math.cos(angle)) * xx + np.float32(math.sin(angle)) * yy)[..., None]
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    img = c0 + (c1 - c0) * t  # [size, size, 3] float32
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = rng.uniform(0, 1, 2)
        rx, ry = rng.uniform(0.05, 0.35, 2)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if rng.random() < 0.5:
            mask = (np.abs(xx - cx) < rx) & (np.abs(yy - cy) < ry)
        else:
            mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        img[mask] = colour
    img += rng.standard_normal(img.shape, dtype=np.float32) * 8
    return np.clip(img, 0, 255).astype(np.uint8)


def open_source(spec: SourceSpec, seed: int = 0, min_side: int = 0) -> Source:
    """Index one configured source (ConfigError when it is missing or holds no images)."""
    kinds = {"folder": FolderSource, "filelist": FileListSource, "tar": TarSource, "views": ViewsSource}
    if spec.type == "synthetic":
        source: Source = SyntheticSource(spec, seed)
    elif spec.type in kinds:
        source = kinds[spec.type](spec)
    else:
        raise ConfigError(
            f"data source {spec.name!r}: type={spec.type!r} is not one of synthetic, {', '.join(kinds)}"
        )
    source.min_side = min_side
    if len(source) == 0:
        raise ConfigError(
            f"data source {spec.name!r}: no images found at {spec.path!r} ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return source
