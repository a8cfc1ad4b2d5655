"""Pre-flight checks of a data config: decode every image once, and preview augmented views.

Training skips unreadable files on the fly; `eupe data-check` finds them all up front (with a
progress bar and a JSON report), so a bad source is noticed before a long run, not in its logs.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .config import DataConfig, validate_data
from .loader import build_loader, open_sources
from .sources import BadImage, Source

MAX_LISTED = 1000  # bad files listed in the report (all are counted)

_SOURCES: list[Source] = []


def _init_worker(sources: list[Source]) -> None:
    global _SOURCES
    _SOURCES = sources


def _check_one(item: tuple[int, int]) -> tuple[int, int, str | None, tuple[int, int] | None]:
    s, i = item
    try:
        img = _SOURCES[s].load(i)
        return s, i, None, img.size
    except BadImage as e:
        return s, i, str(e), None


def _items(sources: list[Source], limit: int | None) -> Iterator[tuple[int, int]]:
    for s, source in enumerate(sources):
        for i in range(len(source) if limit is None else min(limit, len(source))):
            yield s, i


def check_sources(
    cfg: DataConfig, workers: int = 0, limit: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Decode every item (or the first `limit` per source); per-source counts, sizes, bad files."""
    validate_data(cfg)
    sources = open_sources(cfg)
    total = sum(len(s) if limit is None else min(limit, len(s)) for s in sources)
    per: list[dict[str, Any]] = [
        {
            "name": s.spec.name,
            "type": s.spec.type,
            "curated": s.spec.curated,
            "items": 0,
            "bad": 0,
            "sides": [],
        }
        for s in sources
    ]
    bad: list[dict[str, str]] = []
    if workers > 0:
        pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(sources,))
        results = pool.imap(_check_one, _items(sources, limit), chunksize=32)
    else:
        _init_worker(sources)
        pool, results = None, map(_check_one, _items(sources, limit))
    try:
        for s, i, error, size in tqdm(results, total=total, disable=not progress, unit="img"):
            per[s]["items"] += 1
            if error is not None:
                per[s]["bad"] += 1
                if len(bad) < MAX_LISTED:
                    bad.append({"file": f"{sources[s].spec.name}:{sources[s].key(i)}", "reason": error})
            else:
                per[s]["sides"].append(min(size))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for entry in per:
        sides = np.asarray(entry.pop("sides") or [0])
        entry["min_side"] = {
            "min": int(sides.min()),
            "median": int(np.median(sides)),
            "max": int(sides.max()),
        }
    return {
        "checked": sum(p["items"] for p in per),
        "bad": sum(p["bad"] for p in per),
        "sources": per,
        "bad_files": bad,
    }


def save_preview(cfg: DataConfig, path: str | Path, n: int = 16, view_size: int = 128, seed: int = 0) -> Path:
    """A grid PNG of the first `n` augmented views the loader produces (to eyeball augmentations)."""
    loader = build_loader(cfg, n, view_size, seed)
    views = next(loader).views
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = torch.ones(3, rows * (view_size + 2), cols * (view_size + 2))
    for k, view in enumerate(views):
        r, c = divmod(k, cols)
        top, left = r * (view_size + 2) + 1, c * (view_size + 2) + 1
        grid[:, top : top + view_size, left : left + view_size] = view
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    return path
