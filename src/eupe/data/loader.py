"""`build_loader`: an endless, deterministic, resumable, rank-sharded stream of augmented batches.

How a batch is chosen (paper section 3.4): at optimizer step k (every `accum_steps` micro-batches)
a coin seeded by (seed, k) picks the curated stream with probability `curated_prob`, else the
pool; every micro-batch of that step, on every rank, comes from that stream. Each stream walks a
per-epoch keyed permutation (`order.Shuffle`, seeded by seed, stream, epoch: computed per position,
never stored); a global batch takes the next `batch_size x world_size` positions, and rank r takes
its contiguous slice, so ranks never share an item within an epoch. The state is just (step,
position per stream): JSON-able, independent of worker count and valid for any world size.

Every view is augmented from its own generator seeded by (seed, stream, position), and its
parameters travel with the batch (`Batch.params`) so `replay_view` can rebuild it exactly. Workers
decode and crop in uint8; the photometric half runs in the workers or, with `device_augment`,
batched on the training device after a pinned uint8 copy.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..errors import EupeError
from .augment import make_view
from .config import AugmentConfig, DataConfig, decode_side, validate_data
from .index import FILE_TYPES, Index
from .index_build import scan_index
from .order import epoch_order, round_keys
from .photometric import finish_views
from .sources import BadImage, Source, open_source

STREAMS = ("pool", "curated")
MAX_REPLACEMENTS = 32  # consecutive unreadable draws before the source is declared broken
MAX_EXAMPLES = 20
STATE_VERSION = 2  # 2: keyed Feistel shuffle, one coin per optimizer step (1: stored permutations)


@dataclass
class Batch:
    """views: float32 [B,3,S,S] in [0,1] (on the loader's device); params: one replayable dict per view."""

    views: torch.Tensor
    params: list[dict[str, Any]]
    stream: str
    step: int
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.views.shape[0])


class _Stream:
    """The items of one stream (concatenated sources) addressed by a global index."""

    def __init__(self, source_ids: list[int], sizes: list[int]):
        self.source_ids = np.asarray(source_ids, dtype=np.int64)
        self.starts = np.cumsum([0] + [sizes[i] for i in source_ids]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, g: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within it) of global item(s) g."""
        j = np.searchsorted(self.starts, g, side="right") - 1
        return self.source_ids[j], g - self.starts[j]


class _Plan:
    """Which items make up each batch: pure arithmetic on (seed, step, positions)."""

    def __init__(
        self,
        streams: dict[str, _Stream],
        seed: int,
        curated_prob: float,
        batch: int,
        rank: int,
        world: int,
        accum: int = 1,
    ):
        self.streams, self.seed, self.p = streams, seed, curated_prob
        self.batch, self.rank, self.world, self.accum = batch, rank, world, accum
        self.step = 0
        self.pos = {name: 0 for name in streams}

    def clone(self) -> _Plan:
        other = _Plan(self.streams, self.seed, self.p, self.batch, self.rank, self.world, self.accum)
        other.set_state(self.state())
        return other

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "pos": dict(self.pos)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.pos = {name: int(state["pos"].get(name, 0)) for name in self.streams}

    def _pick_stream(self, step: int) -> str:
        """The stream of micro-batch `step`: one coin per optimizer step (`accum` micro-batches)."""
        if len(self.streams) == 1:
            return next(iter(self.streams))
        coin = np.random.default_rng([self.seed, step // self.accum, 0xC0]).random()
        return "curated" if coin < self.p else "pool"

    def items(self, name: str, positions: np.ndarray) -> np.ndarray:
        """The stream's global items at these positions (epoch e: the e-th keyed shuffle)."""
        sid = STREAMS.index(name)
        return epoch_order(positions, len(self.streams[name]), lambda e: round_keys(self.seed, sid, e, 0xE9))

    def next(self) -> tuple[str, int, list[tuple[int, int, int, int]]]:
        """(stream, step, entries) for this rank; entries are (stream id, position, source, index)."""
        name = self._pick_stream(self.step)
        start = self.pos[name] + self.rank * self.batch
        positions = np.arange(start, start + self.batch, dtype=np.int64)
        src, idx = self.streams[name].locate(self.items(name, positions))
        sid = STREAMS.index(name)
        entries = [(sid, int(p), int(s), int(i)) for p, s, i in zip(positions, src, idx)]
        step = self.step
        self.pos[name] += self.batch * self.world
        self.step += 1
        return name, step, entries


def delivery(cfg: DataConfig, device: torch.device | str | None) -> tuple[torch.device, bool]:
    """Where batches go (None: the CPU) and whether the photometric half runs there
    (`data.device_augment`; None means: on a CUDA device)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    on = cfg.device_augment
    return device, device.type == "cuda" if on is None else bool(on)


def deliver(
    views: torch.Tensor, params: list[dict[str, Any]], device: torch.device, augment: bool
) -> torch.Tensor:
    """A collated batch on its device: copied (non-blocking from pinned memory), then finished
    there when the workers left the photometric half to the device."""
    views = views.to(device, non_blocking=True)
    return finish_views(views, params) if augment else views


class _Views(torch.utils.data.Dataset):
    """Decodes and crops one plan entry, and finishes it unless the device will (runs in DataLoader
    workers or in-process)."""

    def __init__(
        self,
        sources: list[Source],
        streams: dict[str, _Stream],
        aug: AugmentConfig,
        size: int,
        seed: int,
        min_side: int,
        finish: bool,
    ):
        self.sources, self.streams, self.aug, self.size, self.seed = sources, streams, aug, size, seed
        self.min_side, self.finish = min_side, finish

    def __len__(self) -> int:  # never used for sampling; the plan drives the loader
        return sum(len(s) for s in self.sources)

    def __getitem__(
        self, entry: tuple[int, int, int, int]
    ) -> tuple[torch.Tensor, dict[str, Any], list[dict]]:
        sid, position, src, idx = entry
        stream = self.streams[STREAMS[sid]]
        skipped: list[dict[str, str]] = []
        for attempt in range(MAX_REPLACEMENTS + 1):
            source = self.sources[src]
            try:
                image = source.load(idx, self.min_side)
                break
            except BadImage as e:
                skipped.append({"file": f"{source.spec.name}:{source.key(idx)}", "reason": str(e)})
                # A deterministic stand-in from the same stream keeps batch size and determinism.
                g = int(
                    np.random.default_rng([self.seed, sid, position, attempt + 1, 0xBAD]).integers(
                        len(stream)
                    )
                )
                src, idx = (int(v) for v in stream.locate(g))
        else:
            raise EupeError(
                f"data: {MAX_REPLACEMENTS + 1} unreadable images in a row (last: {skipped[-1]['reason']}); "
                "is the source mostly corrupt? check data.sources"
            )
        seed = [self.seed, sid, position, 0xA6]
        view, params = make_view(image, self.aug, self.size, seed, finish=self.finish)
        params.update(
            source=src,
            source_name=source.spec.name,
            key=source.key(idx),
            index=idx,
            decode_min_side=self.min_side,
        )
        return view, params, skipped


def _collate(samples: list[tuple[torch.Tensor, dict, list]]) -> tuple[torch.Tensor, list[dict], list[dict]]:
    views = torch.stack([s[0] for s in samples])
    return views, [s[1] for s in samples], [x for s in samples for x in s[2]]


class _PlanSampler:
    """A batch sampler for DataLoader: the entries of consecutive batches from a plan state."""

    def __init__(self, plan: _Plan):
        self.plan = plan.clone()  # the loader's own plan advances only as batches are taken

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        plan = self.plan.clone()
        while True:
            yield plan.next()[2]


class Loader:
    """Iterator of `Batch`es with `state_dict()`/`load_state_dict()` and `stats()`.

    `device`: where batches are delivered (None: the CPU). With `data.device_augment` (default:
    on for CUDA) the workers send uint8 crops in pinned memory and the photometric half runs
    batched on `device`. `accum_steps`: micro-batches per optimizer step (one curated coin each).
    """

    def __init__(
        self,
        cfg: DataConfig,
        batch_size: int,
        view_size: int,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device | str | None = None,
        accum_steps: int = 1,
    ):
        validate_data(cfg)
        if batch_size <= 0 or view_size <= 0 or accum_steps <= 0:
            raise EupeError(
                f"build_loader: batch_size, view_size and accum_steps must be > 0; got {batch_size}, "
                f"{view_size}, {accum_steps}"
            )
        if not 0 <= rank < world_size:
            raise EupeError(f"build_loader: rank {rank} is outside world_size {world_size}")
        self.cfg, self.batch_size, self.view_size, self.seed = cfg, batch_size, view_size, seed
        self.rank, self.world_size = rank, world_size
        self.device, self.device_augment = delivery(cfg, device)
        self.sources = open_sources(cfg, seed)
        sizes = [len(s) for s in self.sources]
        curated = [i for i, s in enumerate(cfg.sources) if s.curated]
        pool = [i for i, s in enumerate(cfg.sources) if not s.curated]
        self.streams = {
            name: _Stream(ids, sizes) for name, ids in (("pool", pool), ("curated", curated)) if ids
        }
        self.plan = _Plan(self.streams, seed, cfg.curated_prob, batch_size, rank, world_size, accum_steps)
        self.dataset = _Views(
            self.sources,
            self.streams,
            cfg.augment,
            view_size,
            seed,
            decode_side(cfg, view_size),
            finish=not self.device_augment,
        )
        self.skipped = 0
        self.bad: dict[str, str] = {}
        self._it: Iterator | None = None
        self._dl: DataLoader | None = None

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Loader:
        return self

    def _start(self) -> Iterator:
        if self.cfg.num_workers == 0:
            return (self._in_process(entries) for entries in _PlanSampler(self.plan))
        if self._dl is None:
            self._dl = DataLoader(
                self.dataset,
                batch_sampler=_PlanSampler(self.plan),
                num_workers=self.cfg.num_workers,
                collate_fn=_collate,
                persistent_workers=self.cfg.persistent_workers,
                prefetch_factor=self.cfg.prefetch_factor,
                pin_memory=self.device.type == "cuda",  # so the copy to the device overlaps
            )
        else:  # a resume: the same workers continue from the restored plan
            self._dl.batch_sampler.plan = self.plan.clone()
        return iter(self._dl)

    def _in_process(self, entries: list[tuple[int, int, int, int]]) -> tuple:
        # Per-image ops on small tensors only lose from intra-op threads (like DataLoader workers).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _collate([self.dataset[e] for e in entries])
        finally:
            torch.set_num_threads(threads)

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._start()
        views, params, skipped = next(self._it)
        stream, step, _ = self.plan.next()  # the same arithmetic the sampler did: keeps the state
        self.skipped += len(skipped)
        for s in skipped:
            if len(self.bad) < MAX_EXAMPLES or s["file"] in self.bad:
                self.bad[s["file"]] = s["reason"]
        views = deliver(views, params, self.device, self.device_augment)
        return Batch(views=views, params=params, stream=stream, step=step, skipped=skipped)

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able position after the last batch returned (prefetched batches do not count)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            **self.plan.state(),
            "sizes": {s.spec.name: len(s) for s in self.sources},
            "skipped": self.skipped,
            "bad_examples": dict(self.bad),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly at the batch after the saved one (any worker count or world size)."""
        sizes = {s.spec.name: len(s) for s in self.sources}
        if state.get("sizes", sizes) != sizes:
            raise EupeError(
                f"data: the sources changed since this state was saved (then {state['sizes']}, now {sizes}); "
                "resuming would not continue the same stream"
            )
        if int(state.get("seed", self.seed)) != self.seed:
            raise EupeError(
                f"data: state was saved with seed {state['seed']}, this loader has seed {self.seed}"
            )
        if int(state.get("version", 1)) < STATE_VERSION:
            warnings.warn(
                "data: this state was saved before the keyed shuffle (eupe data order v2); the run continues "
                "from the same step and positions, but over a different order of the items",
                stacklevel=2,
            )
        self.plan.set_state(state)
        self.skipped = int(state.get("skipped", 0))
        self.bad = dict(state.get("bad_examples", {}))
        self._it = None

    def stats(self) -> dict[str, Any]:
        """Skipped (unreadable) draws so far on this rank, and up to 20 example files with reasons."""
        return {
            "skipped": self.skipped,
            "examples": [{"file": f, "reason": r} for f, r in self.bad.items()],
            "step": self.plan.step,
            "epoch": {name: self.plan.pos[name] / len(s) for name, s in self.streams.items()},
        }

    def load_source_image(self, params: dict[str, Any]) -> Image.Image:
        """Decode the item a view was cut from (for `replay_view`)."""
        return load_source_image(self.sources, params)


def open_sources(cfg: DataConfig, seed: int = 0) -> list[Source]:
    """Open every configured source, in config order (`params["source"]` indexes this list). Tar,
    folder and filelist sources are read through `data.index` (checked against them), or through an
    index scanned in memory now when none is set."""
    files = [s for s in cfg.sources if s.type in FILE_TYPES]
    index = None
    if cfg.index:
        index = Index.open(cfg.index)
    elif files:
        index = scan_index(files)
    return [open_source(s, seed, index) for s in cfg.sources]


def shard_items(sources: list[Source], rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, int, str]]:
    """Every item of every source exactly once over all ranks, as (source, index, key).

    For one pass over a dataset (building the teacher-feature cache): global item g goes to rank
    g % world_size, in config order, so shards are disjoint and balanced to within one item.
    """
    g = 0
    for s, source in enumerate(sources):
        for i in range((rank - g) % world_size, len(source), world_size):
            yield s, i, source.key(i)
        g += len(source)


def load_source_image(sources: list[Source], params: dict[str, Any]) -> Image.Image:
    """Decode the image a recorded view was cut from (at the view's recorded decode size); errors
    if the source changed since."""
    source = sources[int(params["source"])]
    index = int(params["index"])
    if index >= len(source) or source.key(index) != params["key"]:
        raise EupeError(
            f"data: source {source.spec.name!r} no longer has {params['key']!r} at index {index}; "
            "the dataset changed since the view was recorded"
        )
    return source.load(index, int(params.get("decode_min_side", 0)))


def build_loader(
    cfg: DataConfig,
    batch_size: int,
    view_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    accum_steps: int = 1,
) -> Loader:
    """The training stream of one rank: `batch_size` views of side `view_size` per batch, delivered
    on `device`; `accum_steps` micro-batches share one curated/pool coin (see `Loader`)."""
    return Loader(cfg, batch_size, view_size, seed, rank, world_size, device, accum_steps)
