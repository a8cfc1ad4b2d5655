"""Files and folders that appear whole: a reader (a resumed run, a concurrent `eupe` command, a
rank waiting for rank 0) sees the old version or the new one, never a half-written one.

Everything is written beside its target first, then renamed into place: a rename within one
folder is atomic on POSIX file systems. Base layer: standard library only, so every package
(data, distill, eval, vlm) writes its results, indexes and checkpoints the same way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, content: bytes | str | Callable[[Path], object]) -> Path:
    """Write `path` whole: `content` (bytes, or text as UTF-8, or a function that writes the path
    it is given) goes to `<stem>.tmp<suffix>` beside it, which then replaces `path`.

    The temporary name keeps the suffix, so writers that add one when it is missing (`np.save`
    adds `.npy`) write exactly the path they are given. A kill leaves at most that file behind;
    the next write of `path` overwrites it.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    elif isinstance(content, str):
        tmp.write_text(content, encoding="utf-8")
    else:
        content(tmp)
    os.replace(tmp, path)
    return path


def write_atomic_dir(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Call `fill(tmp)` on a fresh temporary folder beside `target`, then put it in place with
    `replace_dir`. For folders that one process writes; a failure leaves no temporary folder,
    and one left by a killed process is removed by the next call."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        fill(tmp)
        fsync_dir(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def replace_dir(tmp: str | Path, target: str | Path) -> Path:
    """Rename the finished folder `tmp` to `target` (a sibling), replacing an older `target` whole.

    A folder cannot be renamed over a non-empty one, so an older `target` is first renamed aside
    (`.old-<name>`) and removed after: `target` is missing only between two renames, and never
    holds a mix of old and new files. The parent folder is synced, so the rename survives a crash.
    """
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    fsync_dir(target.parent)
    return target


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk where the platform allows it (not on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, as hex, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
