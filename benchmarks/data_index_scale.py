"""What a memory-mapped data index (`eupe data index`) costs at 10M-100M images; writes JSON.

For each size N in --sizes, on fake tar shards (sparse files of per_shard x 110 kB that use no disk:
the index only stores where images are, and a run only stats 16 shards at start-up):

  1. build   a synthetic index of N entries (shard = i // per_shard, offset = 512 + (i % per_shard)
             x 110 kB, size 100 kB) with `write_tables`: bytes on disk of the index folder (the
             shards are the data and are not counted), bytes per image, and the time to write this
             metadata. A real build is dominated by tar-header scanning (item 4), not by this.
  2. start   in a fresh subprocess (index files evicted from the page cache first, best-effort):
             `build_loader` with data.index (num_workers=0), then --batches batches of positions
             from `loader.plan.next()` with `source.key(i)` for every entry (random reads of the
             mapped index, no decoding). Start-up seconds and memory (VmRSS; private = Private_Clean
             + Private_Dirty and Rss from smaps_rollup; the Rss of the entries.npy mapping) after
             start-up and after the draws. A subprocess that only imports eupe.data is the baseline.
  3. worker  in that subprocess: a torch DataLoader (num_workers=1, fork) whose Dataset looks up
             the keys of the next --batches plan batches; the worker's own memory after them.
  4. scan    the real builder: `build_index` (workers=1, and workers=0 in-process) over 8 tar
             shards of 1000 img2dataset samples (KEY.jpg with a ~1.1 kB JPEG, KEY.json, KEY.txt);
             samples/s per core and the hours for --target images on --cores cores.
  5. extrapolate to --target images (default 1.7B): bytes on disk, and whether start-up time and
             memory grew between the smallest and the largest size measured.

All temporary files (a 100M index is 1.6 GB) live in one folder (under --workdir, default the
system temp dir) removed at the end, also on errors and Ctrl-C.

    .venv/bin/python benchmarks/data_index_scale.py [--sizes 10000000 100000000] [--per-shard 10000]
        [--batches 200] [--batch 256] [--view 256] [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
MEMBER_STRIDE = 110_000  # bytes between two fake members' data in a fake shard
MEMBER_SIZE = 100_000  # a fake image's size
FILL_CHUNK = 4_000_000  # entries written per chunk while building


# -- memory of this process ------------------------------------------------------------------------
def _kb_fields(path: str) -> dict[str, int]:
    out = {}
    for line in Path(path).read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0])
    return out


def _mapping_kb(suffix: str) -> dict[str, int]:
    """Rss and private (clean + dirty) of this process's mappings of files ending with `suffix` (kB)."""
    total, inside = {"Rss": 0, "Private": 0}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(None, 1)[0] if line.strip() else ""
        if not first.endswith(":"):  # a mapping header: "start-end perms offset dev inode [path]"
            inside = line.rstrip().endswith(suffix)
        elif inside and first == "Rss:":
            total["Rss"] += int(line.split()[1])
        elif inside and first in ("Private_Clean:", "Private_Dirty:"):
            total["Private"] += int(line.split()[1])
    return total


def memory() -> dict[str, float]:
    """This process's memory in MB: VmRSS/VmHWM, and Rss/Pss/private/shared from smaps_rollup; of
    the entries.npy mapping its Rss and private part (index pages that only this process maps count
    as Private_Clean: page cache, not heap), and private without them."""
    status = _kb_fields("/proc/self/status")
    index = _mapping_kb("/entries.npy")
    roll = _kb_fields("/proc/self/smaps_rollup")
    private = roll.get("Private_Clean", 0) + roll.get("Private_Dirty", 0)
    shared = roll.get("Shared_Clean", 0) + roll.get("Shared_Dirty", 0)
    return {
        "vm_rss_mb": round(status.get("VmRSS", 0) / 1024, 1),
        "vm_hwm_mb": round(status.get("VmHWM", 0) / 1024, 1),
        "rss_mb": round(roll.get("Rss", 0) / 1024, 1),
        "pss_mb": round(roll.get("Pss", 0) / 1024, 1),
        "private_mb": round(private / 1024, 1),
        "shared_mb": round(shared / 1024, 1),
        "anonymous_mb": round(roll.get("Anonymous", 0) / 1024, 1),
        "private_excl_index_mb": round((private - index["Private"]) / 1024, 1),
        "entries_map_rss_mb": round(index["Rss"] / 1024, 1),
        "entries_map_private_mb": round(index["Private"] / 1024, 1),
    }


# -- probes: run in a fresh interpreter (`--probe`), print one JSON line ----------------------------
class _Keys:
    """A map-style Dataset (duck-typed) whose item is the key of one plan entry."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, entry: tuple[int, int, int, int]) -> str:
        return self.source.key(entry[3])


class _PlanBatches:
    """A batch sampler: the entries of the next `n` batches of a plan (the plan itself untouched)."""

    def __init__(self, plan: Any, n: int):
        self.plan, self.n = plan, n

    def __iter__(self):
        plan = self.plan.clone()
        for _ in range(self.n):
            yield plan.next()[2]

    def __len__(self) -> int:
        return self.n


class _WorkerCollate:
    """Runs in the DataLoader worker after each batch's lookups; reads the worker's memory after
    its first and its last batch only (reading /proc/self/smaps of a torch process takes ~40 ms)."""

    def __init__(self, batches: int):
        self.batches, self.done = batches, 0

    def __call__(self, keys: list[str]) -> dict[str, Any]:
        self.done += 1  # counts in the worker's copy (one worker: batches arrive in order)
        mem = memory() if self.done in (1, self.batches) else None
        return {"keys": len(keys), "pid": os.getpid(), "memory": mem}


def _probe_baseline() -> dict[str, Any]:
    start = time.perf_counter()
    import eupe.data  # noqa: F401

    return {"import_s": round(time.perf_counter() - start, 3), "memory": memory()}


def _probe_index(index_dir: str, shards_dir: str, batches: int, batch: int, view: int) -> dict[str, Any]:
    start = time.perf_counter()
    import torch

    from eupe.data import DataConfig, SourceSpec, build_loader

    import_s = time.perf_counter() - start
    before = memory()
    cfg = DataConfig(
        sources=[SourceSpec(name="web", type="tar", path=shards_dir)], index=index_dir, num_workers=0
    )
    start = time.perf_counter()
    loader = build_loader(cfg, batch, view, seed=0, rank=0, world_size=1)
    startup_s = time.perf_counter() - start
    after_start = memory()

    source = loader.sources[0]
    entries_offset = int(getattr(source.index.entries, "offset", 0))
    pages: set[int] = set()
    plan_s = key_s = 0.0
    n_keys = 0
    for _ in range(batches):
        t0 = time.perf_counter()
        _, _, entries = loader.plan.next()
        t1 = time.perf_counter()
        for _, _, _, idx in entries:
            source.key(idx)
        t2 = time.perf_counter()
        plan_s, key_s, n_keys = plan_s + t1 - t0, key_s + t2 - t1, n_keys + len(entries)
        pages.update((entries_offset + (source.first + e[3]) * 16) // PAGE for e in entries)
    after_draws = memory()

    dl = torch.utils.data.DataLoader(
        _Keys(source),
        batch_sampler=_PlanBatches(loader.plan, batches),
        num_workers=1,
        multiprocessing_context="fork",
        collate_fn=_WorkerCollate(batches),
        prefetch_factor=2,
    )
    start = time.perf_counter()
    reports = list(dl)
    worker_s = time.perf_counter() - start
    return {
        "import_s": round(import_s, 3),
        "memory_before_start": before,
        "startup_s": round(startup_s, 4),
        "memory_after_start": after_start,
        "draws": {
            "batches": batches,
            "keys": n_keys,
            "plan_ms_per_batch": round(1000 * plan_s / batches, 3),
            "keys_ms_per_batch": round(1000 * key_s / batches, 3),
            "us_per_key": round(1e6 * key_s / max(n_keys, 1), 2),
            "entries_pages_touched_mb": round(len(pages) * PAGE / MB, 1),
        },
        "memory_after_draws": after_draws,
        "worker": {
            "batches": len(reports),
            "keys": sum(r["keys"] for r in reports),
            "seconds": round(worker_s, 3),
            "pid_differs": all(r["pid"] != os.getpid() for r in reports),
            "memory_first_batch": reports[0]["memory"],
            "memory_last_batch": reports[-1]["memory"],
        },
    }


def _run_probe(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", *extra]
    cmd += ["--batches", str(args.batches), "--batch", str(args.batch), "--view", str(args.view)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.probe_timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"probe {extra} failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


# -- 1. a synthetic index ----------------------------------------------------------------------------
def _fake_shards(folder: Path, n: int, per_shard: int) -> list[str]:
    """ceil(n / per_shard) sparse files of per_shard x MEMBER_STRIDE bytes (no blocks used)."""
    folder.mkdir(parents=True)
    paths = []
    for k in range(math.ceil(n / per_shard)):
        path = folder / f"shard-{k:06d}.tar"
        path.touch()
        os.truncate(path, per_shard * MEMBER_STRIDE)
        paths.append(str(path))
    return paths


def _build_synthetic(root: Path, n: int, per_shard: int) -> dict[str, Any]:
    from eupe.data import SourceSpec
    from eupe.data.index import ENTRY
    from eupe.data.index_build import plan_units, write_tables

    shards_dir, index_dir = root / "shards", root / "index"
    start = time.perf_counter()
    shard_paths = _fake_shards(shards_dir, n, per_shard)
    shards_s = time.perf_counter() - start

    index_dir.mkdir(parents=True)
    start = time.perf_counter()
    entries = np.lib.format.open_memmap(index_dir / "entries.npy", mode="w+", dtype=ENTRY, shape=(n,))
    chunk = np.empty(min(n, FILL_CHUNK), dtype=ENTRY)
    for lo in range(0, n, FILL_CHUNK):
        i = np.arange(lo, min(n, lo + FILL_CHUNK), dtype=np.int64)
        part = chunk[: len(i)]
        part["shard"] = i // per_shard
        part["offset"] = 512 + (i % per_shard) * MEMBER_STRIDE
        part["size"] = MEMBER_SIZE
        entries[lo : lo + len(i)] = part
    entries.flush()
    del entries, chunk
    fill_s = time.perf_counter() - start

    start = time.perf_counter()
    plan = plan_units([SourceSpec(name="web", type="tar", path=str(shards_dir))])  # what build_index plans
    plan_s = time.perf_counter() - start
    assert plan[0]["units"] == shard_paths
    counts = [min(per_shard, n - k * per_shard) for k in range(len(shard_paths))]
    start = time.perf_counter()
    meta = write_tables(index_dir, plan, counts, shard_paths, [])
    tables_s = time.perf_counter() - start
    assert meta["items"] == n

    start = time.perf_counter()
    evicted = _sync_and_evict(index_dir)
    sync_s = time.perf_counter() - start
    files = {p.name: p.stat() for p in sorted(index_dir.iterdir()) if p.is_file()}
    total = sum(s.st_size for s in files.values())
    return {
        "index_dir": str(index_dir),
        "shards_dir": str(shards_dir),
        "shards": len(shard_paths),
        "index": {
            "bytes": total,
            "bytes_allocated": sum(s.st_blocks * 512 for s in files.values()),
            "bytes_per_image": round(total / n, 3),
            "files": {name: s.st_size for name, s in files.items()},
        },
        "build": {
            "entries_fill_s": round(fill_s, 3),
            "plan_glob_s": round(plan_s, 3),
            "write_tables_s": round(tables_s, 3),
            "total_s": round(fill_s + plan_s + tables_s, 3),
            "fsync_evict_s": round(sync_s, 3),
            "fake_shards_s": round(shards_s, 3),
            "page_cache_evicted": evicted,
        },
    }


def _sync_and_evict(folder: Path) -> bool:
    """fsync every index file and drop it from the page cache (best-effort: needs no root)."""
    ok = hasattr(os, "posix_fadvise")
    for path in folder.iterdir():
        if not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            if ok:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            ok = False
        finally:
            os.close(fd)
    return ok


# -- 4. the real builder's scan rate -----------------------------------------------------------------
def _tiny_jpeg() -> bytes:
    from PIL import Image

    from eupe.data import synthetic_image

    buf = io.BytesIO()
    Image.fromarray(synthetic_image(0, 0, 48)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _write_img2dataset_tars(folder: Path, shards: int, samples: int) -> int:
    """img2dataset's layout: per sample KEY.jpg, KEY.json, KEY.txt (KEY = shard + sample digits)."""
    folder.mkdir(parents=True)
    jpeg = _tiny_jpeg()
    now = time.time()
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", mode="w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(samples):
                key = f"{s:05d}{i:04d}"
                meta = {
                    "url": f"https://example.com/{key}.jpg",
                    "key": key,
                    "status": "success",
                    "caption": f"a photo {key}",
                    "width": 48,
                    "height": 48,
                }
                for name, data in (
                    (f"{key}.jpg", jpeg),
                    (f"{key}.json", json.dumps(meta).encode()),
                    (f"{key}.txt", f"a photo {key}".encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), now, 0o644
                    tar.addfile(info, io.BytesIO(data))
    return len(jpeg)


def _scan_rate(
    root: Path, shards: int, samples: int, repeats: int, target: float, cores: int
) -> dict[str, Any]:
    from eupe.data import SourceSpec, build_index

    tars = root / "tars"
    jpeg_bytes = _write_img2dataset_tars(tars, shards, samples)
    spec = SourceSpec(name="scan", type="tar", path=str(tars))
    n = shards * samples
    out: dict[str, Any] = {
        "shards": shards,
        "samples_per_shard": samples,
        "members_per_sample": 3,
        "jpeg_bytes": jpeg_bytes,
        "repeats": repeats,
        "note": "best of repeats; the tars were just written (page cache warm), so this is the CPU "
        "cost of the Python tarfile scan: an upper bound for shards on cold or network storage",
    }
    for workers in (1, 0):
        best = float("inf")
        for _ in range(repeats):
            index_dir = root / f"scan_index_w{workers}"
            shutil.rmtree(index_dir, ignore_errors=True)
            meta = build_index([spec], index_dir, workers=workers, progress=False)
            assert meta["items"] == n, meta["items"]
            best = min(best, meta["seconds"])
            shutil.rmtree(index_dir)
        rate = n / best
        out[f"workers_{workers}"] = {
            "seconds": round(best, 3),
            "samples_per_s_per_core": round(rate, 1),
            "members_per_s_per_core": round(3 * rate, 1),
            "target_hours": round(target / (rate * cores) / 3600, 2),
        }
    return out


# -- report ------------------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def _extrapolate(sizes: list[dict[str, Any]], per_shard: int, target: float) -> dict[str, Any]:
    from eupe.data.index import ENTRY

    big = max(sizes, key=lambda s: s["n"])
    small = min(sizes, key=lambda s: s["n"])
    files = big["index"]["files"]
    line = files["shards.txt"] / big["shards"]
    shards = math.ceil(target / per_shard)
    fixed = sum(
        v
        for k, v in files.items()
        if k not in ("entries.npy", "shards.txt", "shard_offsets.npy", "shard_bytes.npy")
    )
    total = target * ENTRY.itemsize + shards * (line + 16) + 3 * 128 + 128 + fixed
    out: dict[str, Any] = {
        "target_images": int(target),
        "shards": shards,
        "shards_txt_bytes_per_shard_measured": round(line, 1),
        "bytes_on_disk": int(total),
        "gb_on_disk": round(total / 1e9, 2),
        "bytes_per_image": round(total / target, 4),
        "note": "16 B/image entries + per shard one path line (length as measured here; real paths "
        "may be longer) + 8 B offset + 8 B size; index.json is O(sources)",
    }
    if big is not small:
        pairs = {
            "startup_s": lambda s: s["probe"]["startup_s"],
            "private_mb_after_start": lambda s: s["probe"]["memory_after_start"]["private_mb"],
            "vm_rss_mb_after_start": lambda s: s["probe"]["memory_after_start"]["vm_rss_mb"],
            "private_mb_after_draws": lambda s: s["probe"]["memory_after_draws"]["private_mb"],
            "private_excl_index_mb_after_draws": lambda s: s["probe"]["memory_after_draws"][
                "private_excl_index_mb"
            ],
            "vm_rss_mb_after_draws": lambda s: s["probe"]["memory_after_draws"]["vm_rss_mb"],
            "worker_private_mb": lambda s: s["probe"]["worker"]["memory_last_batch"]["private_mb"],
            "worker_private_excl_index_mb": lambda s: s["probe"]["worker"]["memory_last_batch"][
                "private_excl_index_mb"
            ],
            "worker_vm_rss_mb": lambda s: s["probe"]["worker"]["memory_last_batch"]["vm_rss_mb"],
        }
        growth = {k: _ratio(f(big), f(small)) for k, f in pairs.items()}
        out["growth_largest_over_smallest"] = {"n_ratio": _ratio(big["n"], small["n"]), **growth}
        startup = (pairs["startup_s"](small), pairs["startup_s"](big))
        out["startup_flat"] = startup[1] < 1.5 * startup[0] or startup[1] - startup[0] < 0.05
        out["private_memory_flat"] = all(
            growth[k] is not None and growth[k] < 1.2
            for k in (
                "private_mb_after_start",
                "private_excl_index_mb_after_draws",
                "worker_private_excl_index_mb",
            )
        )
        out["flat_rule"] = (
            "start-up flat: largest < 1.5x smallest or < 50 ms more; private memory flat: private after "
            "start-up, and private without the mapped index pages after the draws and in the worker, each "
            "< 1.2x. Rss and plain private after the draws grow with the index pages touched (page cache)"
        )
    return out


def _print_tables(report: dict[str, Any]) -> None:
    base = report["baseline"]["memory"]
    print(
        f"\nbaseline (import eupe.data only): VmRSS {base['vm_rss_mb']} MB, private {base['private_mb']} MB, "
        f"anonymous {base['anonymous_mb']} MB, import {report['baseline']['import_s']} s"
    )
    print("\n1. index on disk and metadata write time")
    print(
        f"{'images':>12} {'shards':>7} {'index MB':>9} {'B/image':>8} {'fill s':>7} {'tables s':>8} {'build s':>8}"
    )
    for s in report["sizes"]:
        b = s["build"]
        print(
            f"{s['n']:>12,} {s['shards']:>7} {s['index']['bytes'] / MB:>9.1f} {s['index']['bytes_per_image']:>8.3f} "
            f"{b['entries_fill_s']:>7.2f} {b['write_tables_s']:>8.3f} {b['total_s']:>8.2f}"
        )
    print("\n2. per rank (fresh process, build_loader with data.index): memory in MB")
    print(
        f"{'images':>12} {'start s':>8} | {'after start-up: RSS':>19} {'private':>8} {'priv-ix':>8} | "
        f"{'after draws: RSS':>16} {'private':>8} {'priv-ix':>8} {'index':>6} {'touch':>6} | {'ms/batch':>8} {'us/key':>7}"
    )
    for s in report["sizes"]:
        p = s["probe"]
        st, dr, d = p["memory_after_start"], p["memory_after_draws"], p["draws"]
        print(
            f"{s['n']:>12,} {p['startup_s']:>8.3f} | {st['vm_rss_mb']:>19.1f} {st['private_mb']:>8.1f} "
            f"{st['private_excl_index_mb']:>8.1f} | {dr['vm_rss_mb']:>16.1f} {dr['private_mb']:>8.1f} "
            f"{dr['private_excl_index_mb']:>8.1f} {dr['entries_map_rss_mb']:>6.1f} {d['entries_pages_touched_mb']:>6.1f} | "
            f"{d['plan_ms_per_batch'] + d['keys_ms_per_batch']:>8.2f} {d['us_per_key']:>7.2f}"
        )
    print("\n3. per DataLoader worker (fork, after its key lookups): memory in MB")
    print(f"{'images':>12} {'RSS':>8} {'private':>8} {'priv-ix':>8} {'PSS':>8} {'index':>6} {'seconds':>8}")
    for s in report["sizes"]:
        w = s["probe"]["worker"]
        m = w["memory_last_batch"]
        print(
            f"{s['n']:>12,} {m['vm_rss_mb']:>8.1f} {m['private_mb']:>8.1f} {m['private_excl_index_mb']:>8.1f} "
            f"{m['pss_mb']:>8.1f} {m['entries_map_rss_mb']:>6.1f} {w['seconds']:>8.2f}"
        )
    print(
        "   RSS = VmRSS, private = Private_Clean+Private_Dirty (smaps_rollup), priv-ix = private without the"
    )
    print(
        "   entries.npy pages (mapped index pages only this process maps count as private), index = Rss of the"
    )
    print(
        "   entries.npy mapping, touch = MB of distinct index pages the draws hit, ms/batch = plan + key lookups"
    )
    sc = report["scan"]
    print(
        f"\n4. build_index scan ({sc['shards']} tars x {sc['samples_per_shard']} img2dataset samples, jpeg {sc['jpeg_bytes']} B)"
    )
    for w in (1, 0):
        r = sc[f"workers_{w}"]
        print(
            f"   workers={w}: {r['seconds']:.3f} s, {r['samples_per_s_per_core']:,.0f} samples/s/core "
            f"({r['members_per_s_per_core']:,.0f} members/s) -> {report['extrapolation']['target_images'] / 1e9:.2f}B "
            f"images on {report['args']['cores']} cores: {r['target_hours']:.2f} h"
        )
    ex = report["extrapolation"]
    print(
        f"\n5. at {ex['target_images'] / 1e9:.2f}B images: {ex['shards']:,} shards, index {ex['gb_on_disk']:.2f} GB "
        f"({ex['bytes_per_image']} B/image)"
    )
    if "growth_largest_over_smallest" in ex:
        g = ex["growth_largest_over_smallest"]
        print("   growth largest/smallest size: " + ", ".join(f"{k} {v}" for k, v in g.items()))
        print(f"   start-up flat: {ex['startup_flat']}, private memory flat: {ex['private_memory_flat']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 100_000_000])
    ap.add_argument("--per-shard", type=int, default=10_000, help="images per fake tar shard")
    ap.add_argument("--batches", type=int, default=200, help="plan batches drawn per rank and per worker")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--view", type=int, default=256)
    ap.add_argument("--scan-shards", type=int, default=8)
    ap.add_argument("--scan-samples", type=int, default=1000)
    ap.add_argument("--scan-repeats", type=int, default=3)
    ap.add_argument("--target", type=float, default=1.7e9, help="images to extrapolate to")
    ap.add_argument("--cores", type=int, default=64, help="cores for the extrapolated build time")
    ap.add_argument("--workdir", default=None, help="where the temporary folder goes (default: system temp)")
    ap.add_argument("--probe-timeout", type=float, default=1800)
    ap.add_argument("--out", default="benchmarks/results/data_index_scale.json")
    ap.add_argument("--probe", nargs="*", help=argparse.SUPPRESS)  # internal: run one probe, print JSON
    args = ap.parse_args()

    if args.probe is not None:
        result = (
            _probe_baseline()
            if args.probe == ["baseline"]
            else _probe_index(*args.probe, args.batches, args.batch, args.view)
        )
        print(json.dumps(result))
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` cleans up on kill
    work = Path(tempfile.mkdtemp(prefix="eupe_index_scale_", dir=args.workdir))
    sizes: list[dict[str, Any]] = []
    try:
        import eupe.data  # noqa: F401  (as every probe runs: shared-library pages then count as shared)

        baseline = _run_probe(args, "baseline")
        for n in sorted(args.sizes):
            root = work / f"n{n}"
            try:
                print(f"size {n:,}: building ...", flush=True)
                row = {"n": n, "per_shard": args.per_shard, **_build_synthetic(root, n, args.per_shard)}
                print(
                    f"size {n:,}: index {row['index']['bytes'] / MB:.1f} MB in {row['build']['total_s']:.2f} s; "
                    "start-up probe ...",
                    flush=True,
                )
                row["probe"] = _run_probe(args, row.pop("index_dir"), row.pop("shards_dir"))
                sizes.append(row)
            finally:
                shutil.rmtree(root, ignore_errors=True)
        print("scan rate of build_index ...", flush=True)
        scan = _scan_rate(
            work / "scan", args.scan_shards, args.scan_samples, args.scan_repeats, args.target, args.cores
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import torch

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k not in ("probe", "out", "workdir")},
        "notes": [
            "build.total_s is the write time of metadata only (entries filled from arithmetic, then "
            "write_tables); a real build is dominated by the tar-header scan measured under `scan`",
            "index bytes: entries.npy + shards.txt + shard_offsets.npy + shard_bytes.npy + index.json; the "
            "sparse fake shards are the data and are not counted",
            "each probe is a fresh interpreter; the index files are fsynced and dropped from the page cache "
            "before it (posix_fadvise DONTNEED, best-effort), so start-up and draws read a cold index",
            "private = Private_Clean + Private_Dirty from /proc/self/smaps_rollup; Rss/VmRSS also count "
            "pages shared with other processes, e.g. the page-cache pages of the mapped entries.npy. A "
            "file page (a shared library, an index page) counts as private while no other process maps it, "
            "so this script imports eupe.data itself before any probe; private_excl_index_mb leaves out "
            "the entries.npy pages, anonymous_mb is heap only",
            "worker = a torch DataLoader worker (num_workers=1, fork) forked after start-up and the draws, "
            "looking up the keys of the next `batches` plan batches; memory read in the worker after its last batch",
        ],
        "baseline": baseline,
        "sizes": sizes,
        "scan": scan,
    }
    report["extrapolation"] = _extrapolate(sizes, args.per_shard, args.target)
    _print_tables(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
