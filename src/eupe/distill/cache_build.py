"""`eupe cache-teacher`: build a teacher-feature cache (format and reader: `eupe.distill.cache`).

1. TeacherNorm is measured exactly as a live run of the same config measures it (the first
   `norm.batches` batches of its loader), so a cached run trains against the same targets;
2. every image of the sources (sharded over ranks under torchrun, no duplicates) gets K views,
   view k augmented from a generator seeded by (seed, source, index, k); workers decode and
   augment (`data.num_workers`);
3. the teachers run on batches of views at their native resolution, the normalized targets are
   cast (bf16 / fp8) and appended to the open shard, which is written whole (safetensors) once
   full: sequential writes only;
4. each rank writes its index; the ranks meet on a gloo group that waits `cache.finish_timeout_s`
   for the slowest shard, add up their counts on the device, and rank 0 writes `cache.json` and
   `teacher_norm.safetensors` last, so a folder with a cache.json is complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data import BadImage, build_loader, make_view, open_sources, shard_items
from ..data.config import decode_side
from ..errors import ConfigError
from ..models.teacher_norm import TeacherNorm
from ..runtime import init_distributed, pick_device, seed_everything
from ..teachers import build_teacher_from_spec
from .cache import CACHE_FILE, DTYPES, VIEW_SEED, CacheConfig, shard_name
from .config import DistillConfig, micro_batch, student_resolutions
from .norm import measure_norm


def load_cache_config(options: list[str]) -> CacheConfig:
    """A checked CacheConfig from `key=value` options (`dir=C`, `views=4`; `eupe cache-teacher`
    passes its `cache.*` overrides without the prefix)."""
    try:
        cc = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(CacheConfig), OmegaConf.from_dotlist(options))
        )
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"invalid cache option: {str(e).splitlines()[0]} (known: {', '.join(asdict(CacheConfig()))})"
        ) from None
    assert isinstance(cc, CacheConfig)
    if not cc.dir:
        raise ConfigError("cache.dir is unset; pass cache.dir=DIR (the folder to write the cache to)")
    if cc.views < 1 or cc.shard_views < 1 or cc.batch < 1:
        raise ConfigError(
            f"cache.views, cache.shard_views and cache.batch must be >= 1; got {cc.views}, {cc.shard_views}, {cc.batch}"
        )
    if cc.dtype not in DTYPES:
        raise ConfigError(f"cache.dtype={cc.dtype!r} is not one of {', '.join(DTYPES)}")
    if cc.finish_timeout_s <= 0:
        raise ConfigError(f"cache.finish_timeout_s must be > 0 (seconds); got {cc.finish_timeout_s}")
    return cc


class _ImageViews(Dataset):
    """(source, index, key) -> its K augmented views and their params (None if unreadable)."""

    def __init__(self, cfg: DistillConfig, items: list[tuple[int, int, str]], views: int, view_size: int):
        self.cfg, self.items, self.views, self.view_size = cfg, items, views, view_size
        self._sources = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list, list[dict[str, Any]], str | None]:
        if self._sources is None:
            self._sources = open_sources(self.cfg.data, self.cfg.seed)
        src, idx, key = self.items[i]
        source = self._sources[src]
        min_side = decode_side(self.cfg.data, self.view_size)
        try:
            image = source.load(idx, min_side)
        except BadImage as e:
            return [], [], f"{source.spec.name}:{key}: {e}"
        views, params = [], []
        for k in range(self.views):
            view, p = make_view(
                image, self.cfg.data.augment, self.view_size, [self.cfg.seed, src, idx, k, VIEW_SEED]
            )
            p.update(
                source=src, source_name=source.spec.name, key=key, index=idx, view=k, decode_min_side=min_side
            )
            views.append(view)
            params.append(p)
        return views, params, None


def _measure_norm(
    cfg: DistillConfig,
    teachers: dict,
    view_size: int,
    device: torch.device,
    rank: int,
    world: int,
    progress: bool,
) -> TeacherNorm:
    norm = TeacherNorm({n: (t.cls_dim, t.patch_dim) for n, t in teachers.items()}).to(device)
    accum = cfg.train.accum_steps
    loader = build_loader(cfg.data, micro_batch(cfg), view_size, cfg.seed, rank, world, device, accum)
    n = cfg.norm.batches * accum  # norm.batches counts optimizer steps
    views = (next(loader).views for _ in tqdm(range(n), desc="TeacherNorm", disable=not progress))
    return measure_norm(norm, teachers, views)


def _sum_over_ranks(
    counts: list[int], device: torch.device, finish: torch.distributed.ProcessGroup | None
) -> list[int]:
    """`counts` added up over all ranks. They first wait for the slowest on `finish` (gloo, with the
    cache's long timeout), so the reduction on the default group, which NCCL only does on device
    tensors, is immediate."""
    if finish is None:
        return counts
    torch.distributed.barrier(group=finish)
    total = torch.tensor(counts, dtype=torch.int64, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()


def build_cache(cfg: DistillConfig, cc: CacheConfig) -> dict[str, Any]:
    """Write the cache for `cfg` into `cc.dir`; returns the summary also stored in cache.json."""

    if cfg.stage == "pyramid":
        raise ConfigError("stage 'pyramid' draws teacher scales per iteration; cache a fixed-stage config")
    if cfg.data.teacher_cache:
        raise ConfigError("data.teacher_cache is set; a cache is built from live teachers (remove it)")
    out = Path(cc.dir)
    if (out / CACHE_FILE).exists():
        raise ConfigError(f"cache.dir={cc.dir!r} already holds a cache; choose another folder")
    device = pick_device(cfg.train.device, setting="train.device", tf32=True)
    rank, world = init_distributed(device, cfg.train.dist_timeout_s)
    timeout = timedelta(seconds=cc.finish_timeout_s)  # new_group is collective: every rank, here
    finish = torch.distributed.new_group(backend="gloo", timeout=timeout) if world > 1 else None
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    teachers = {
        n: build_teacher_from_spec(n, s, seed=cfg.seed, device=device).to(device).eval()
        for n, s in cfg.teachers.items()
    }
    view_size = max([*student_resolutions(cfg), *(t.resolution for t in teachers.values())])
    progress = cfg.train.progress and not rank
    out.mkdir(parents=True, exist_ok=True)
    norm = _measure_norm(cfg, teachers, view_size, device, rank, world, progress)

    items = list(shard_items(open_sources(cfg.data, cfg.seed), rank, world))
    loader = DataLoader(
        _ImageViews(cfg, items, cc.views, view_size),
        batch_size=None,
        num_workers=cfg.data.num_workers,
    )
    dtype = DTYPES[cc.dtype]
    index: list[dict[str, Any]] = []
    buffer: dict[str, list[torch.Tensor]] = {}
    pending_views: list[torch.Tensor] = []
    pending_params: list[dict[str, Any]] = []
    state = {"shard": 0, "rows": 0, "bytes": 0, "skipped": []}
    grids: dict[str, tuple[int, int]] = {}

    def run_teachers() -> None:
        if not pending_views:
            return
        views = torch.stack(pending_views).to(device)
        for name, teacher in teachers.items():
            y = norm.normalize(name, teacher(views))
            grids[name] = tuple(y.grid)
            for kind, x in (("cls", y.cls), ("patches", y.patches)):
                if dtype == torch.float8_e4m3fn:  # fp8 casts overflow to NaN, not to the max
                    x = x.clamp(-448.0, 448.0)
                buffer.setdefault(f"{name}.{kind}", []).append(x.to(dtype).cpu())
        for p in pending_params:
            index.append({"shard": shard_name(rank, state["shard"]), "row": state["rows"], "params": p})
            state["rows"] += 1
        pending_views.clear()
        pending_params.clear()
        if state["rows"] >= cc.shard_views:
            flush()

    def flush() -> None:
        if not state["rows"]:
            return
        path = out / shard_name(rank, state["shard"])
        save_file({k: torch.cat(v).contiguous() for k, v in buffer.items()}, str(path))
        state["bytes"] += path.stat().st_size
        buffer.clear()
        state["shard"], state["rows"] = state["shard"] + 1, 0

    start = time.perf_counter()
    with torch.no_grad():
        for views, params, bad in tqdm(
            loader, total=len(items), desc="cache", unit="img", disable=not progress
        ):
            if bad:
                state["skipped"].append(bad)
                continue
            for v, p in zip(views, params):
                pending_views.append(v)
                pending_params.append(p)
                if len(pending_views) == cc.batch or state["rows"] + len(pending_views) >= cc.shard_views:
                    run_teachers()
        run_teachers()
        flush()
    seconds = time.perf_counter() - start
    (out / f"index_r{rank}.json").write_text(json.dumps(index))
    counts = [len(index), state["bytes"], len(state["skipped"])]
    n_views, n_bytes, n_skipped = _sum_over_ranks(counts, device, finish)
    summary = {
        "version": 1,
        "teachers": {
            n: {
                "resolution": t.resolution,
                "stride": t.stride,
                "cls_dim": t.cls_dim,
                "patch_dim": t.patch_dim,
                "grid": list(grids.get(n, (t.resolution // t.stride,) * 2)),
            }
            for n, t in teachers.items()
        },
        "view_size": view_size,
        "views_per_image": cc.views,
        "dtype": cc.dtype,
        "seed": cfg.seed,
        "world_size": world,
        "views": n_views,
        "images": n_views // cc.views,
        "skipped": n_skipped,
        "skipped_examples": state["skipped"][:20],
        "bytes": n_bytes,
        "bytes_per_view": n_bytes / max(1, n_views),
        "build_seconds": seconds,
        "views_per_s": n_views / max(seconds, 1e-9),
        "teacher_specs": {n: asdict(s) for n, s in cfg.teachers.items()},
    }
    if not rank:  # last: a cache.json marks a complete cache
        norm.save(out)
        (out / CACHE_FILE).write_text(json.dumps(summary, indent=1))
    if world > 1:
        torch.distributed.barrier()
    return summary
