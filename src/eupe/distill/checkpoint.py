"""Training checkpoints: folders of safetensors + JSON (never pickle), committed by a marker.

Every rank writes its own parts of `checkpoints/step_<N>/` in place (its DCP shards, its RNG
states; rank 0 also the replicated students, TeacherNorm and the trainer state), so no rank moves
another rank's files and nodes need no shared rename. After all ranks are done (a barrier, and the
background write of an asynchronous save), rank 0 writes `COMPLETE`: only a folder holding it is
a checkpoint. A run killed mid-write leaves a folder without it, which resume ignores and the
next save of that step replaces. Optimizer state is split into its tensors (safetensors) and the
rest (JSON); RNG states of python, numpy and torch go the same way. `final/` and other
single-writer folders use `eupe.files.write_atomic_dir` (a temporary folder renamed into place).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import atomic_write, fsync_dir

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step_(\d+)$")


COMPLETE = "COMPLETE"


def is_complete(path: Path) -> bool:
    """A committed checkpoint (or one from before markers, written whole by a single rename)."""
    return (path / COMPLETE).is_file() or (path / "rng.json").is_file()


def _step_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
    )


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `output_dir/checkpoints`, oldest first."""
    return [(step, p) for step, p in _step_dirs(output_dir) if is_complete(p)]


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all), and incomplete folders
    older than the newest complete one (left by a kill; nothing will resume from them)."""
    complete = list_checkpoints(output_dir)
    if complete:
        newest = complete[-1][0]
        for step, path in _step_dirs(output_dir):
            if step < newest and not is_complete(path):
                shutil.rmtree(path, ignore_errors=True)
    if keep > 0:
        for _, path in complete[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def commit(path: Path) -> None:
    """Mark a fully written checkpoint folder complete (durably: file, then folder, fsynced)."""
    marker = path / COMPLETE
    with open(marker, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step}"


# -- JSON + tensors -----------------------------------------------------------------------------
def save_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True))


def load_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint part ({e})") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint part ({type(e).__name__}: {e})") from None


# -- optimizer ------------------------------------------------------------------------------------
def split_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """A nested state (dicts/lists of tensors and plain values) -> (JSON skeleton, tensors).

    Each tensor is replaced in the skeleton by {"__tensor__": key}; dict keys become strings and
    their original type is remembered so integer parameter ids come back as integers.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj
            return {"__tensor__": path}
        if isinstance(obj, dict):
            return {
                "__dict__": [
                    [k, type(k).__name__, walk(v, f"{path}.{k}" if path else str(k))] for k, v in obj.items()
                ]
            }
        if isinstance(obj, (list, tuple)):
            return {
                "__seq__": type(obj).__name__,
                "items": [walk(v, f"{path}.{i}") for i, v in enumerate(obj)],
            }
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store {type(obj).__name__} at '{path}' in a checkpoint")

    return walk(state, prefix), tensors


def join_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `split_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            cast = {"int": int, "str": str, "float": float, "bool": bool}
            return {cast[kt](k): join_state(v, tensors) for k, kt, v in skeleton["__dict__"]}
        if "__seq__" in skeleton:
            items = [join_state(v, tensors) for v in skeleton["items"]]
            return tuple(items) if skeleton["__seq__"] == "tuple" else items
    return skeleton


def save_state(directory: Path, name: str, state: Any) -> None:
    """Write a nested state as `<name>.json` + `<name>.safetensors`."""
    skeleton, tensors = split_state(state)
    save_tensors(directory / f"{name}.safetensors", tensors)
    save_json(directory / f"{name}.json", skeleton)


def load_state(directory: Path, name: str) -> Any:
    return join_state(load_json(directory / f"{name}.json"), load_tensors(directory / f"{name}.safetensors"))


# -- RNG ------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Global RNG states of python, numpy and torch (CPU and every CUDA device)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [
            np_name,
            torch.from_numpy(np.asarray(np_keys).astype(np.int64)),
            np_pos,
            np_has_gauss,
            np_gauss,
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # this rank's device only (each rank saves its own state)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, list) else cuda)  # a list: older checkpoints


# -- metrics --------------------------------------------------------------------------------------
def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop metrics lines logged after `step` (and a torn last line), so a resumed run appends
    exactly the steps that follow its checkpoint."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if int(row.get("step", -1)) <= step:
            kept.append(line)
    atomic_write(path, "".join(line + "\n" for line in kept))
