"""Building an index (data/index.py): `eupe data index`, and the in-memory scan of a run without one.

Sources are planned into units (a tar shard, a folder's top-level subfolder, a file list), one
shard each, and scanned one unit per task, in parallel. `build_index` keeps each finished unit in
DIR/parts/ until the end and writes index.json last, so a killed build resumes where it stopped and
a half-built folder is never mistaken for an index.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import ConfigError
from ..files import atomic_write
from .config import SourceSpec
from .index import ENTRY, FILE_TYPES, VERSION, Index, is_image


# -- planning: the units (= shards) of every source ---------------------------------------------------
def plan_units(specs: list[SourceSpec]) -> list[dict[str, Any]]:
    """Per source: its id and units, in the order the index will hold them (no file is read)."""
    plan = []
    for spec in specs:
        if spec.type not in FILE_TYPES:
            raise ConfigError(
                f"data index: source {spec.name!r} has type {spec.type!r}; only {FILE_TYPES} are indexed"
            )
        path = os.path.abspath(spec.path)
        if spec.type == "tar":
            units = (
                sorted(glob.glob(os.path.join(path, "*.tar")))
                if os.path.isdir(path)
                else sorted(glob.glob(path))
            )
            if not units:
                raise ConfigError(
                    f"data source {spec.name!r}: no .tar shards at {spec.path!r} (a .tar, a folder or a glob)"
                )
        elif spec.type == "folder":
            if not os.path.isdir(path):
                raise ConfigError(f"data source {spec.name!r}: folder {spec.path!r} does not exist")
            subdirs = sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=True))
            units = ["."] + subdirs  # "." = the files directly in the folder
        else:
            if not os.path.isfile(path):
                raise ConfigError(f"data source {spec.name!r}: file list {spec.path!r} does not exist")
            units = [path]
        plan.append({"name": spec.name, "type": spec.type, "path": path, "units": units})
    return plan


# -- scanning one unit ------------------------------------------------------------------------------
def _scan_tar(shard: str) -> tuple[list[tuple[int, int]], str | None]:
    found: list[tuple[int, int]] = []
    try:
        with tarfile.open(shard, mode="r:") as tar:
            while (m := tar.next()) is not None:
                if m.isfile() and is_image(m.name):
                    found.append((m.offset_data, m.size))
                tar.members.clear()  # one member at a time: memory stays flat on big shards
    except (tarfile.TarError, EOFError, OSError) as e:  # keep the members before the damage
        return found, f"shard {shard} is damaged; using the {len(found)} members before the damage ({e})"
    return found, None


def _walk(root: str, unit: str) -> list[str]:
    """Image paths under root/unit relative to root, sorted (recursive except for unit '.')."""
    if unit == ".":
        return sorted(e.name for e in os.scandir(root) if e.is_file() and is_image(e.name))
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, unit), followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle (or a second link to the same folder): walk it once
            dirnames.clear()
            continue
        seen.add(real)
        rel = os.path.relpath(dirpath, root)
        found += [os.path.normpath(os.path.join(rel, f)) for f in filenames if is_image(f)]
    return sorted(found)


def _names_entries(blob: bytes, shard: int, list_file: bool) -> np.ndarray:
    """One entry per name in a names blob: (shard, byte offset, length). A file list's lines are
    stripped, and blank lines and '#' comments skipped; a folder's generated names are exact."""
    rows, pos = [], 0
    for line in blob.split(b"\n"):
        text = line.strip() if list_file else line
        if text and not (list_file and text.startswith(b"#")):
            rows.append((shard, pos + len(line) - len(line.lstrip()) if list_file else pos, len(text)))
        pos += len(line) + 1
    return np.array(rows, dtype=ENTRY)


def _scan(task: tuple[int, str, str, str]) -> tuple[int, np.ndarray, bytes | None, str | None]:
    """(shard, entries, names blob for a folder unit, warning) for one unit."""
    shard, kind, root, unit = task
    if kind == "tar":
        found, warning = _scan_tar(unit)
        entries = np.array([(shard, o, s) for o, s in found], dtype=ENTRY)
        return shard, entries, None, warning
    if kind == "folder":
        blob = "\n".join(_walk(root, unit)).encode("utf-8")
        return shard, _names_entries(blob, shard, list_file=False), blob, None
    return shard, _names_entries(Path(unit).read_bytes(), shard, list_file=True), None, None


def _tasks(plan: list[dict[str, Any]]) -> list[tuple[int, str, str, str]]:
    tasks = []
    for src in plan:
        tasks += [(len(tasks) + k, src["type"], src["path"], u) for k, u in enumerate(src["units"])]
    return tasks


def _run(tasks: list, workers: int, progress: bool, desc: str):
    if workers > 0 and len(tasks) > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            yield from tqdm(
                pool.imap_unordered(_scan, tasks),
                total=len(tasks),
                disable=not progress,
                desc=desc,
                unit="shard",
            )
    else:
        yield from (_scan(t) for t in tqdm(tasks, disable=not progress, desc=desc, unit="shard"))


def _layout(plan: list[dict[str, Any]], counts: list[int], shard_paths: list[str]) -> list[dict[str, Any]]:
    """Each source's item range and shard range, for index.json."""
    sources, item, shard = [], 0, 0
    for src in plan:
        n_shards = len(src["units"])
        items = int(sum(counts[shard : shard + n_shards]))
        sources.append(
            {k: src[k] for k in ("name", "type", "path")}
            | {"items": [item, items], "shards": [shard, n_shards]}
        )
        item, shard = item + items, shard + n_shards
    return sources


def _digest(plan: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()


# -- building on disk ------------------------------------------------------------------------------
def _save_array(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.save(tmp, array))


def write_tables(
    out: Path,
    plan: list[dict[str, Any]],
    counts: list[int],
    shard_paths: list[str],
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Everything of an index folder but entries.npy (which the caller has written): the shard
    table, and index.json last, which makes the index whole. Returns index.json's content."""
    lines = "".join(p + "\n" for p in shard_paths).encode("utf-8")
    atomic_write(out / "shards.txt", lines)
    lengths = [len(p.encode("utf-8")) + 1 for p in shard_paths]
    _save_array(out / "shard_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint64))
    sizes = [os.path.getsize(p if os.path.isabs(p) else out / p) for p in shard_paths]
    _save_array(out / "shard_bytes.npy", np.array(sizes, dtype=np.uint64))
    meta = {
        "format": "eupe-data-index",
        "version": VERSION,
        "items": int(sum(counts)),
        "shards": len(shard_paths),
        "bytes_per_item": ENTRY.itemsize,
        "sources": _layout(plan, counts, shard_paths),
        "warnings": notes or [],
        "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "plan_digest": _digest(plan),  # the scanned units (not stored: O(shards) would grow index.json)
    }
    atomic_write(out / "index.json", json.dumps(meta, indent=1).encode())
    return meta


def _unchanged(out: Path) -> bool:
    """Does every shard of a finished index still have the size it was indexed at?"""
    try:
        index = Index.open(out)
        for src in index.meta["sources"]:
            index.check_shards(src, every=True)
    except ConfigError:
        return False
    return True


def build_index(
    specs: list[SourceSpec], out: str | Path, workers: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Scan `specs` (tar / folder / filelist) into index folder `out`; resumes a killed build.
    Returns index.json's content (plus `seconds`)."""
    start = time.perf_counter()
    out = Path(out)
    plan = plan_units(specs)
    plan_text = json.dumps(plan)
    parts = out / "parts"
    if (out / "index.json").exists():
        meta = json.loads((out / "index.json").read_text())
        if meta.get("plan_digest") == _digest(plan) and _unchanged(out):
            return meta | {"seconds": time.perf_counter() - start, "reused": True}
        (out / "index.json").unlink()  # the sources changed: rebuild
    if parts.is_dir() and (
        not (parts / "plan.json").exists() or (parts / "plan.json").read_text() != plan_text
    ):
        shutil.rmtree(parts)  # an interrupted build of other sources
    for sub in (parts, out / "names"):
        sub.mkdir(parents=True, exist_ok=True)
    atomic_write(parts / "plan.json", plan_text.encode())
    tasks = _tasks(plan)
    todo = [t for t in tasks if not (parts / f"{t[0]}.npy").exists()]
    for shard, entries, blob, warning in _run(todo, workers, progress, f"index {out.name}"):
        if blob is not None:
            atomic_write(out / "names" / f"{shard}.txt", blob)
        if warning:
            atomic_write(parts / f"{shard}.warn", warning.encode())
        _save_array(parts / f"{shard}.npy", entries)  # last: marks the unit done
    shard_paths, counts, notes = [], [], []
    for shard, kind, _root, unit in tasks:
        shard_paths.append(f"names/{shard}.txt" if kind == "folder" else unit)
        counts.append(len(np.load(parts / f"{shard}.npy", mmap_mode="r")))
        if (parts / f"{shard}.warn").exists():
            notes.append((parts / f"{shard}.warn").read_text())

    def concatenate(path: Path) -> None:  # unit by unit: the whole table never sits in memory
        entries = np.lib.format.open_memmap(path, mode="w+", dtype=ENTRY, shape=(int(sum(counts)),))
        at = 0
        for (shard, *_), n in zip(tasks, counts):
            entries[at : at + n] = np.load(parts / f"{shard}.npy")
            at += n
        entries.flush()

    atomic_write(out / "entries.npy", concatenate)
    meta = write_tables(out, plan, counts, shard_paths, notes)
    shutil.rmtree(parts)
    return meta | {"seconds": time.perf_counter() - start}


def scan_index(specs: list[SourceSpec], workers: int = 0) -> Index:
    """The index of `specs` built in this process's memory (what a run without data.index does)."""
    plan = plan_units(specs)
    tasks = _tasks(plan)
    found = {
        shard: (entries, blob, warning) for shard, entries, blob, warning in _run(tasks, workers, False, "")
    }
    for _, _, warning in found.values():
        if warning:
            warnings.warn(f"data: {warning}", stacklevel=3)
    counts = [len(found[t[0]][0]) for t in tasks]
    paths = [f"<memory>/{t[0]}" if t[1] == "folder" else t[3] for t in tasks]
    meta = {"items": int(sum(counts)), "sources": _layout(plan, counts, paths)}
    names = {s: blob for s, (_, blob, _) in found.items() if blob is not None}
    entries = np.concatenate([found[t[0]][0] for t in tasks]) if tasks else np.zeros(0, ENTRY)
    return Index(meta, entries, None, paths, names)


def describe(meta: dict[str, Any]) -> dict[str, Any]:
    """A short JSON summary of an index (what `eupe data index` prints)."""
    return {
        "items": meta["items"],
        "shards": meta.get("shards"),
        "bytes_per_item": ENTRY.itemsize,
        "sources": [{"name": s["name"], "type": s["type"], "items": s["items"][1]} for s in meta["sources"]],
        "warnings": meta.get("warnings", []),
    }
