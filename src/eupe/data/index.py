"""The index of image sources (tar shards, folders, file lists): 16 bytes per image, memory-mapped.

Every image is one entry (shard u32, offset u64, size u32). In a tar shard, offset/size locate the
member's bytes, read with one `pread`; in a *names* shard (a folder's generated list of relative
paths, or a file list itself) they locate the image's path. An index folder holds

    DIR/index.json          sources (name, type, path, their items and shards), totals, warnings
    DIR/entries.npy         [N] entries, 16 bytes per image, memory-mapped by every rank and worker
    DIR/shards.txt          one shard path per line; DIR/shard_offsets.npy [S+1] its line offsets
    DIR/shard_bytes.npy     each shard's size when indexed (a run checks a sample of them)
    DIR/names/S.txt         a folder source's relative image paths, one file per scanned unit

so opening one costs the same for a thousand images or two billion. `index_build` writes it
(`eupe data index`) or scans sources into the same arrays in memory (a run without data.index).
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .config import SourceSpec

ENTRY = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("size", "<u4")])  # 16 bytes, packed
FILE_TYPES = ("tar", "folder", "filelist")
VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
CHECKED_SHARDS = 16  # shards per source whose size a run compares with the index


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def source_id(spec: SourceSpec) -> tuple[str, str]:
    """What an index matches a configured source by: its type and absolute path (not its name)."""
    return spec.type, os.path.abspath(spec.path)


# -- reading -----------------------------------------------------------------------------------------
class Index:
    """The entries and shard table of some sources, memory-mapped from a folder (`Index.open`) or
    scanned in memory (`index_build.scan_index`)."""

    def __init__(
        self,
        meta: dict[str, Any],
        entries: np.ndarray,
        folder: Path | None,
        shard_paths: list[str] | None,
        names: dict[int, bytes] | None,
    ):
        self.meta, self.entries, self.folder = meta, entries, folder
        self._paths, self._names = shard_paths, names if names is not None else {}
        self._maps: dict[int, Any] = {}
        if folder is not None:
            self._offsets = np.load(folder / "shard_offsets.npy", mmap_mode="r")
            self._bytes = np.load(folder / "shard_bytes.npy", mmap_mode="r")

    @classmethod
    def open(cls, folder: str | Path) -> Index:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "index.json").read_text())
            entries = np.load(folder / "entries.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"data.index={str(folder)!r} is not a finished index ({type(e).__name__}: {e}); build it with "
                "`eupe data index CONFIG --out DIR`"
            ) from None
        if (
            meta.get("format") != "eupe-data-index"
            or meta.get("version") != VERSION
            or entries.dtype != ENTRY
        ):
            raise ConfigError(
                f"data.index={str(folder)!r}: not an eupe data index of version {VERSION}; rebuild it"
            )
        if len(entries) != meta["items"]:
            raise ConfigError(
                f"data.index={str(folder)!r}: entries.npy holds {len(entries)} entries, index.json says "
                f"{meta['items']}; the folder is damaged, rebuild it"
            )
        if hasattr(entries, "_mmap") and hasattr(mmap, "MADV_RANDOM"):
            entries._mmap.madvise(mmap.MADV_RANDOM)  # one 4 KiB page per lookup, no readahead
        try:
            return cls(meta, entries, folder, None, None)
        except (OSError, ValueError) as e:  # the shard table is missing or damaged
            raise ConfigError(
                f"data.index={str(folder)!r}: its shard table is unreadable ({type(e).__name__}); rebuild it"
            ) from None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for spawn/forkserver workers: a folder index is reopened there (its memory map
        would otherwise be copied whole), an in-memory one travels as it is."""
        state = dict(self.__dict__, _maps={})
        if self.folder is not None:
            for key in ("entries", "_offsets", "_bytes"):
                state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.folder is not None:
            fresh = Index.open(self.folder)
            self.entries, self._offsets, self._bytes = fresh.entries, fresh._offsets, fresh._bytes

    def shard_path(self, shard: int) -> str:
        """Absolute path of a shard (a tar file, a file list, or a folder's names file)."""
        if self._paths is not None:
            return self._paths[shard]
        blob = self._blob("shards", self.folder / "shards.txt")
        path = bytes(blob[int(self._offsets[shard]) : int(self._offsets[shard + 1]) - 1]).decode("utf-8")
        return path if os.path.isabs(path) else str(self.folder / path)

    def name(self, entry: np.void) -> str:
        """The relative image path a names entry points at."""
        shard = int(entry["shard"])
        blob = self._names.get(shard)
        if blob is None:
            blob = self._blob(shard, self.shard_path(shard))
        start = int(entry["offset"])
        return bytes(blob[start : start + int(entry["size"])]).decode("utf-8")

    def _blob(self, key: Any, path: str | Path) -> Any:
        """A whole file memory-mapped once per process (read-only, shared page cache)."""
        m = self._maps.get(key)
        if m is None:
            with open(path, "rb") as f:
                m = self._maps[key] = (
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
                )
        return m

    def find(self, spec: SourceSpec) -> dict[str, Any]:
        """The index's record of a configured source (ConfigError, with the fix, if it has none)."""
        want = source_id(spec)
        for src in self.meta["sources"]:
            if (src["type"], src["path"]) == want:
                return src
        built = ", ".join(f"{s['type']}:{s['path']}" for s in self.meta["sources"])
        raise ConfigError(
            f"data.index={str(self.folder)!r} does not cover source {spec.name!r} ({want[0]}:{want[1]}); it was "
            f"built for {built}. Rebuild it: `eupe data index CONFIG --out {self.folder}`"
        )

    def check_shards(self, src: dict[str, Any], every: bool = False) -> None:
        """Compare the size of up to CHECKED_SHARDS shards of a source (all with `every`) with the
        index: O(1) in images at start-up."""
        if self.folder is None:
            return
        first, count = src["shards"]
        picked = range(count) if every else np.linspace(0, count - 1, min(count, CHECKED_SHARDS))
        for shard in sorted({first + int(k) for k in picked}):
            path = self.shard_path(shard)
            want = int(self._bytes[shard])
            have = os.path.getsize(path) if os.path.exists(path) else None
            if have != want:
                raise ConfigError(
                    f"data.index={str(self.folder)!r}: shard {path} is {'missing' if have is None else f'{have} bytes'}, "
                    f"the index was built when it had {want} bytes; the data changed, rebuild the index"
                )
