"""Teacher-feature cache: run the teachers once, train students many times (issue 6).

`eupe cache-teacher CONFIG cache.dir=DIR cache.views=K` writes, for every image of the config's
sources, K augmented views' **normalized** teacher targets (cls + patch tokens of every teacher at
its native resolution), plus the augmentation parameters of each view, so the student's view is
replayed exactly from the source image (`eupe.data.replay_view`). A flipped view is a view of
its own (flip is one of the recorded parameters and is replayed on the pixels); features are
never mirrored.

Layout of DIR (sequential writes, no pickle):

    cache.json                 teachers (dims, grid, resolution), view size, K, dtype, counts, bytes
    teacher_norm.safetensors   the TeacherNorm the targets were normalized with (measured first,
                               over the same first `norm.batches` batches a live run measures)
    index_r<rank>.json         per view: shard, row, augmentation params (source, key, crop, flip, ...)
    shard_r<rank>_<i>.safetensors   rows of `<teacher>.cls` [n, Dc] and `<teacher>.patches` [n, N, Dp]

A run reads it with `data.teacher_cache=DIR` (see `TeacherCache.loader`): the views are walked
in a seeded per-epoch keyed shuffle (`data.order.Shuffle`), sharded over ranks like the live loader, resumable, decoded and
replayed by `data.num_workers` DataLoader workers that read their rows from the memory-mapped shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from ..data import DataConfig, load_source_image, open_sources, replay_view
from ..data.augment import crop_view
from ..data.loader import deliver, delivery
from ..data.order import epoch_order, round_keys
from ..errors import ConfigError, EupeError
from ..models.encoder import EncoderOutput
from ..models.teacher_norm import TeacherNorm

CACHE_FILE = "cache.json"
DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp32": torch.float32}
VIEW_SEED = 0xCAC4E  # mixed into each cached view's augmentation seed


@dataclass
class CacheConfig:
    """`cache.*` options of `eupe cache-teacher` (not part of the distill config)."""

    dir: str = ""
    views: int = 2  # K augmented views per image
    dtype: str = "bf16"  # bf16 | fp8 (e4m3, targets are unit-variance after TeacherNorm) | fp32
    shard_views: int = 512  # views per shard file
    batch: int = 32  # views per teacher forward
    # how long ranks that finished their shard wait for the slowest one (not train.dist_timeout_s,
    # which is for a rank that died: a slow shard or disk is no reason to kill the build)
    finish_timeout_s: float = 86400.0


def shard_name(rank: int, i: int) -> str:
    return f"shard_r{rank}_{i:05d}.safetensors"


# -- reading -----------------------------------------------------------------------------------------
class TeacherCache:
    """An opened cache folder (metadata, TeacherNorm, per-view index)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        meta_path = self.dir / CACHE_FILE
        if not meta_path.is_file():
            raise ConfigError(
                f"data.teacher_cache={str(self.dir)!r}: no {CACHE_FILE}; build it with "
                "`eupe cache-teacher CONFIG cache.dir=DIR`"
            )
        self.meta = json.loads(meta_path.read_text())
        self.norm = TeacherNorm.load(self.dir)
        self.entries: list[dict[str, Any]] = []
        for rank in range(int(self.meta["world_size"])):
            self.entries += json.loads((self.dir / f"index_r{rank}.json").read_text())
        if not self.entries:
            raise EupeError(f"{self.dir}: the cache holds no views")

    @property
    def teachers(self) -> dict[str, dict[str, Any]]:
        return self.meta["teachers"]

    def loader(self, data: DataConfig, *args: Any, **kwargs: Any) -> CacheLoader:
        """A `CacheLoader` over this cache (its arguments after the cache)."""
        return CacheLoader(self, data, *args, **kwargs)


class _CachedViews(Dataset):
    """Entry -> (replayed view, {teacher: (cls, patches)} rows, params); runs in workers."""

    def __init__(self, cache: TeacherCache, data: DataConfig, view_size: int, seed: int, finish: bool = True):
        self.dir, self.entries, self.teachers = cache.dir, cache.entries, list(cache.teachers)
        self.data, self.view_size, self.seed, self.finish = data, view_size, seed, finish
        self._sources = None
        self._files: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _rows(self, shard: str, row: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        f = self._files.get(shard)
        if f is None:  # memory-mapped; one handle per shard per worker
            f = self._files[shard] = safe_open(str(self.dir / shard), "pt")
        return {t: (f.get_slice(f"{t}.cls")[row], f.get_slice(f"{t}.patches")[row]) for t in self.teachers}

    def __getitem__(self, i: int) -> tuple:
        e = self.entries[i]
        if self._sources is None:
            self._sources = open_sources(self.data, self.seed)
        params = e["params"]
        image = load_source_image(self._sources, params)
        if self.finish:
            view = replay_view(image, params, self.view_size)
        else:  # the photometric half runs batched on the device (data.device_augment)
            view = crop_view(image, params, self.view_size)
        return view, self._rows(e["shard"], int(e["row"])), params


def _collate(samples: list[tuple]) -> tuple:
    views = torch.stack([s[0] for s in samples])
    targets = {
        t: (torch.stack([s[1][t][0] for s in samples]), torch.stack([s[1][t][1] for s in samples]))
        for t in samples[0][1]
    }
    return views, targets, [s[2] for s in samples]


@dataclass
class CachedBatch:
    views: torch.Tensor
    targets: dict[str, EncoderOutput]  # normalized, in the cache's dtype (float32 once on the device)
    params: list[dict[str, Any]]


class CacheLoader:
    """Endless, seeded, rank-sharded, resumable batches of (replayed views, cached targets)."""

    def __init__(
        self,
        cache: TeacherCache,
        data: DataConfig,
        batch_size: int,
        view_size: int,
        seed: int,
        rank: int,
        world: int,
        device: torch.device | str | None = None,
    ):
        if view_size != int(cache.meta["view_size"]):
            raise ConfigError(
                f"data.teacher_cache: cached views are {cache.meta['view_size']} px but this run needs "
                f"{view_size} px views (the largest student/teacher side); rebuild the cache with the "
                "run's config"
            )
        self.cache, self.data, self.batch, self.seed = cache, data, batch_size, seed
        self.rank, self.world = rank, world
        self.device, self.device_augment = delivery(data, device)
        self.dataset = _CachedViews(cache, data, view_size, seed, finish=not self.device_augment)
        self.grids = {t: tuple(m["grid"]) for t, m in cache.teachers.items()}
        self.step, self.pos = 0, 0
        self._it = None

    def _indices(self, step_pos: int) -> list[int]:
        """This rank's views of the global batch starting at position `step_pos`."""
        start = step_pos + self.rank * self.batch
        positions = np.arange(start, start + self.batch, dtype=np.int64)
        order = epoch_order(positions, len(self.dataset), lambda e: round_keys(self.seed, e, VIEW_SEED))
        return order.tolist()  # a keyed shuffle per epoch, never materialised

    def _sampler(self):
        pos = self.pos
        while True:
            yield self._indices(pos)
            pos += self.batch * self.world

    def __iter__(self) -> CacheLoader:
        return self

    def __next__(self) -> CachedBatch:
        if self._it is None:
            if self.data.num_workers:
                self._it = iter(
                    DataLoader(
                        self.dataset,
                        batch_sampler=self._sampler(),
                        num_workers=self.data.num_workers,
                        collate_fn=_collate,
                        prefetch_factor=self.data.prefetch_factor,
                        pin_memory=self.device.type == "cuda",
                    )
                )
            else:
                self._it = (_collate([self.dataset[i] for i in idx]) for idx in self._sampler())
        views, rows, params = next(self._it)
        views = deliver(views, params, self.device, self.device_augment)
        self.step += 1
        self.pos += self.batch * self.world
        # the stored (bf16/fp8) rows as they are, pinned by the DataLoader on a GPU run: one copy to
        # the device, upcast there (`CachedTargets.targets`)
        targets = {
            t: EncoderOutput(cls=c, patches=p, registers=None, grid=self.grids[t])
            for t, (c, p) in rows.items()
        }
        return CachedBatch(views=views, targets=targets, params=params)

    def state_dict(self) -> dict[str, Any]:
        return {"cache": str(self.cache.dir), "views": len(self.dataset), "step": self.step, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("views", len(self.dataset))) != len(self.dataset):
            raise EupeError(
                f"data: the teacher cache now holds {len(self.dataset)} views, the checkpoint saw "
                f"{state['views']}; resume with the same cache"
            )
        self.step, self.pos, self._it = int(state["step"]), int(state["pos"]), None

    def stats(self) -> dict[str, Any]:
        return {"skipped": 0, "examples": [], "step": self.step, "epoch": self.pos / len(self.dataset)}
