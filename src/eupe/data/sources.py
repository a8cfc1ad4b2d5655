"""Image sources: numbered items, each with a stable key, decoded on demand.

Tar, folder and file-list sources read their items through an `Index` (data/index.py: 16 bytes
per image, memory-mapped when built once with `eupe data index`); decoding happens in the loader's
workers. A file that does not decode (corrupt,
truncated, not an image) raises `BadImage`, which the loader counts and replaces; it never ends a
run.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .config import SourceSpec
from .index import FILE_TYPES, IMAGE_EXTENSIONS, Index
from .index_build import scan_index

# Refuse decompression bombs loudly but per-file: PIL raises DecompressionBombError above this.
Image.MAX_IMAGE_PIXELS = 200_000_000


class BadImage(Exception):
    """One item could not be decoded into an RGB image (the reason is the message)."""


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
    """Base: `key(i)` names item i (stable across runs); `load(i, min_side)` decodes it."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, index: int) -> str:
        raise NotImplementedError

    def load(self, index: int, min_side: int = 0) -> Image.Image:
        """Item `index` as RGB; `min_side` > 0 allows a reduced JPEG decode (see decode_image)."""
        raise NotImplementedError


class IndexedSource(Source):
    """A tar / folder / filelist source read through an `Index` (16 bytes per image, shared).

    Tar members are read with one `pread` from a per-process cache of open shard files; folder and
    file-list items are paths (relative to the folder, or to the list's folder) opened on demand.
    A tar item's key is `<shard file>@<member offset>`, a path item's key is its path.
    """

    MAX_OPEN = 64  # open shard files kept per process

    def __init__(self, spec: SourceSpec, index: Index, record: dict):
        super().__init__(spec)
        self.index = index
        self.first, self.count = (int(v) for v in record["items"])
        self.tar = spec.type == "tar"
        self.root = record["path"] if spec.type == "folder" else os.path.dirname(record["path"])
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return self.count

    def _entry(self, index: int) -> np.void:
        if not 0 <= index < self.count:
            raise IndexError(f"{self.spec.name}: item {index} is outside [0, {self.count})")
        return self.index.entries[self.first + index]

    def key(self, index: int) -> str:
        e = self._entry(index)
        if self.tar:
            return f"{os.path.basename(self.index.shard_path(int(e['shard'])))}@{int(e['offset'])}"
        return self.index.name(e)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= self.MAX_OPEN:
                for old in self._fds.values():
                    os.close(old)
                self._fds.clear()
            fd = self._fds[shard] = os.open(self.index.shard_path(shard), os.O_RDONLY)
        return os.pread(fd, size, offset)

    def load(self, index: int, min_side: int = 0) -> Image.Image:
        e = self._entry(index)
        if not self.tar:
            name = self.index.name(e)
            file = name if os.path.isabs(name) else os.path.join(self.root, name)
            if not os.path.isfile(file):
                raise BadImage(f"{self.spec.name}:{name}: no such file")
            return decode_image(file, f"{self.spec.name}:{name}", min_side)
        shard, offset, size = int(e["shard"]), int(e["offset"]), int(e["size"])
        try:
            data = self._read(shard, offset, size)
            if len(data) != size:
                raise BadImage("shard ends inside the member")
            return decode_image(data, "", min_side)
        except (
            BadImage,
            OSError,
        ) as err:  # name the item, and the member (its tar header sits before the data)
            header = self._read(shard, offset - 512, 100) if offset >= 512 else b""
            member = header.split(b"\0", 1)[0].decode("utf-8", "replace")
            reason = str(err).removeprefix(": ")
            raise BadImage(f"{self.spec.name}:{self.key(index)}: {reason} (member {member})") from None


class SyntheticSource(Source):
    """Deterministic generated images (gradients, shapes, noise) from (seed, index): no files."""

    def __init__(self, spec: SourceSpec, seed: int = 0):
        super().__init__(spec)
        self.seed = seed

    def __len__(self) -> int:
        return self.spec.size

    def key(self, index: int) -> str:
        return f"synthetic/{index:08d}"

    def load(self, index: int, min_side: int = 0) -> Image.Image:
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
        self.count = int(shape[0])
        self._views = None

    def __len__(self) -> int:
        return self.count

    def key(self, index: int) -> str:
        return f"view/{index:07d}"

    def load(self, index: int, min_side: int = 0) -> Image.Image:
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


def open_source(spec: SourceSpec, seed: int = 0, index: Index | None = None) -> Source:
    """Open one configured source (ConfigError when it is missing or holds no images). Tar, folder
    and filelist sources are read through `index` (`Index.open` of data.index, or `scan_index`)."""
    if spec.type == "synthetic":
        source: Source = SyntheticSource(spec, seed)
    elif spec.type == "views":
        source = ViewsSource(spec)
    elif spec.type in FILE_TYPES:
        index = index if index is not None else scan_index([spec])
        record = index.find(spec)
        index.check_shards(record)
        source = IndexedSource(spec, index, record)
    else:
        raise ConfigError(
            f"data source {spec.name!r}: type={spec.type!r} is not one of synthetic, views, {', '.join(FILE_TYPES)}"
        )
    if len(source) == 0:
        raise ConfigError(
            f"data source {spec.name!r}: no images found at {spec.path!r} ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return source
