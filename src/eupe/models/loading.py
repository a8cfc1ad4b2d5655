"""Strict weight loading for zoo encoders: official EUPE `.pth`, our own folders, the Hub.

Foreign key layouts are remapped with timm's own checkpoint filters (the same ones timm uses for
the released DINOv3/EUPE weights); everything then loads strictly, and any problem becomes one
`CheckpointError` line naming the file, the expected model and the first mismatching keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from timm.models.convnext import checkpoint_filter_fn as convnext_filter
from timm.models.eva import checkpoint_filter_fn as eva_filter

from ..errors import CheckpointError
from .encoder import Encoder
from .zoo import ZOO

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PREFIX = "backbone."


def _is_hub_id(source: str) -> bool:
    return not os.path.exists(source) and bool(_HUB_ID.match(source))


def _hub_file(repo_id: str, filename: str, **hub_kwargs: Any) -> str:
    from huggingface_hub import hf_hub_download

    allowed = {"revision", "cache_dir", "force_download", "token", "local_files_only"}
    try:
        return hf_hub_download(repo_id, filename, **{k: v for k, v in hub_kwargs.items() if k in allowed})
    except Exception as e:  # offline, missing repo, missing file: all the same to the user
        raise CheckpointError(
            f"{repo_id}: could not fetch {filename} from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
            "pass a local file or folder when offline"
        ) from None


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header."""
    return len(head) > 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _why_unreadable(path: Path, error: Exception) -> str:
    """A few words on why `path` is not a checkpoint, from its first bytes and the loader's error."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError as e:
        return f"cannot read it ({e.strerror or type(e).__name__})"
    if not head:
        return "empty file"
    detail = str(error).strip()
    for cut in range(4):  # the 4096-byte read may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if all(ch.isprintable() or ch.isspace() for ch in text):
            return "a text file, not a checkpoint"
        break
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
            return "a PyTorch file named .safetensors (rename it to .pth)"
        if "incomplete metadata" in detail or "not fully covered" in detail:
            return "truncated safetensors file"
        short = detail.splitlines()[0].split(": ")[-1][:80] if detail else type(error).__name__
        return f"corrupt safetensors file ({short})"
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", detail)
    if refused:  # weights_only loading refuses arbitrary objects: say which one
        return f"holds a pickled {refused.group(1)}, not only tensors (refused by weights_only loading)"
    if head[:4] == b"PK\x03\x04":
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "truncated or corrupt PyTorch zip archive"
        if not any(n.endswith("data.pkl") for n in names):
            return "a zip archive, but not a PyTorch checkpoint"
        return f"corrupt PyTorch zip archive ({type(error).__name__})"
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy format, or a plain pickle.dump
        if "Weights only load failed" in detail:
            return "a pickle that weights_only loading refuses (not a torch.save state_dict)"
        return "truncated or corrupt pickle"
    return "not a PyTorch or safetensors file"


def read_state_dict(path: str | os.PathLike, expected: str = "") -> dict[str, torch.Tensor]:
    """Read tensors from `.safetensors`, or from `.pth`/`.pt`/`.bin` with `weights_only=True`.

    `expected` names the model being loaded (e.g. "eupe_vitb16 (timm vit_base_patch16_dinov3)");
    every error is one line naming the file, that model and the reason in a few words.
    """
    path = Path(path)
    target = f" for {expected}" if expected else ""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (weights{target})")
    try:
        with path.open("rb") as f:
            head = f.read(16)
        if path.suffix == ".safetensors" or _looks_like_safetensors(head):
            return load_safetensors(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt or foreign files raise many different types
        raise CheckpointError(
            f"{path}: not a readable checkpoint{target}: {_why_unreadable(path, e)}"
        ) from None
    # Official and training checkpoints sometimes nest the weights.
    for key in ("model_ema", "model", "state_dict", "module", "teacher"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: not a state_dict{target} (holds a {type(obj).__name__}, expected names -> tensors)"
        )
    return obj


def _file_layout(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith(_PREFIX) for k in state):
        return "eupe"
    if "storage_tokens" in state or any(".ls1.gamma" in k for k in state):
        return "official ViT"
    if any(k.startswith("downsample_layers.") for k in state):
        return "official ConvNeXt"
    return "timm"


def _to_backbone_layout(
    state: dict[str, torch.Tensor], model: Encoder, source: str
) -> dict[str, torch.Tensor]:
    """Remap any supported key layout to this module's `backbone.*` keys."""
    layout = _file_layout(state)
    if layout.startswith("official") and not layout.lower().endswith(model.family):
        raise CheckpointError(
            f"{source}: is an {layout} checkpoint, but the expected model {model.arch} is a "
            f"{model.family}; pick the zoo name that matches the file"
        )
    if layout == "official ViT":
        state = eva_filter(state, model.backbone)
    elif layout == "official ConvNeXt":
        state = convnext_filter(state, model.backbone)
    return state if layout == "eupe" else {_PREFIX + k: v for k, v in state.items()}


def _describe(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def expected_model(model: Encoder) -> str:
    """How error messages name the model a checkpoint is loaded into."""
    return f"{model.arch} (timm {model.spec.timm_name})"


def load_state_dict_strict(model: Encoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Load with every key and shape checked first; raise one CheckpointError line on mismatch."""
    expected = expected_model(model)
    try:
        state = _to_backbone_layout(state, model, source)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{source}: does not fit {expected}: key remapping failed at {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'no detail'}"
        ) from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches [{_describe(shapes)}]")
        if missing:
            parts.append(f"{len(missing)} missing keys [{_describe(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys [{_describe(unexpected)}]")
        raise CheckpointError(f"{source}: does not fit {expected}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def read_config(source: str, **hub_kwargs: Any) -> dict[str, Any]:
    path = (
        Path(source) / CONFIG_NAME
        if os.path.isdir(source)
        else Path(_hub_file(source, CONFIG_NAME, **hub_kwargs))
    )
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable model config ({e})") from None
    if not isinstance(config, dict) or config.get("arch") not in ZOO:
        raise CheckpointError(f"{path}: not an eupe model config (needs 'arch' naming a zoo model)")
    return config


def load_pretrained_dir(source: str, **hub_kwargs: Any) -> Encoder:
    """Build the model a `save_pretrained` folder (or Hub repo) describes and load its weights."""
    if not os.path.isdir(source) and not _is_hub_id(source):
        raise CheckpointError(
            f"{source}: not a folder with {CONFIG_NAME} + {WEIGHTS_NAME}, nor a Hub repo id"
        )
    config = read_config(source, **hub_kwargs)
    model = Encoder(arch=config["arch"], overrides=config.get("overrides"))
    weights = (
        Path(source) / WEIGHTS_NAME
        if os.path.isdir(source)
        else _hub_file(source, WEIGHTS_NAME, **hub_kwargs)
    )
    load_state_dict_strict(model, read_state_dict(weights, expected_model(model)), str(weights))
    return model


def load_weights(model: Encoder, source: str | os.PathLike) -> Encoder:
    """Load `source` (a checkpoint file, a `save_pretrained` folder or a Hub repo id) into `model`."""
    source = str(source)
    if os.path.isdir(source) or _is_hub_id(source):
        weights = Path(source) / WEIGHTS_NAME if os.path.isdir(source) else _hub_file(source, WEIGHTS_NAME)
        if os.path.isdir(source) and not weights.is_file():
            raise CheckpointError(
                f"{source}: folder has no {WEIGHTS_NAME} (weights for {expected_model(model)})"
            )
        source = str(weights)
    load_state_dict_strict(model, read_state_dict(source, expected_model(model)), source)
    return model


def create_model(
    name_or_path: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> Encoder:
    """Build an encoder.

    `name_or_path` is a zoo name (`eupe models` lists them), a `save_pretrained` folder, a
    transformers folder written by `eupe export --format hf`, or a Hub repo id in eupe's format. `weights` is an official EUPE `.pth`, a `.safetensors`/`.pth` file or
    folder written by this project, or a Hub repo id. `device="meta"` builds without allocating
    memory (for counting parameters and FLOPs of the 1.9B proxy). `overrides` go to timm.
    """
    name = str(name_or_path)
    if name not in ZOO:
        if weights is not None:
            raise CheckpointError(f"{name}: pass weights only with a zoo name; a folder already has weights")
        if not (os.path.isdir(name) or _is_hub_id(name)):
            raise CheckpointError(
                f"unknown model '{name}': not a zoo name ({', '.join(ZOO)}) and not a folder"
            )
        if overrides or device == "meta":
            raise CheckpointError(f"{name}: overrides and device='meta' apply to zoo names only")
        from .hf import is_hf_dir, load_hf  # a transformers folder (`eupe export --format hf`)

        model = load_hf(name) if os.path.isdir(name) and is_hf_dir(name) else load_pretrained_dir(name)
        return model.to(device) if device is not None else model
    if weights is not None and str(device) == "meta":
        raise CheckpointError("weights cannot be loaded into a model built on the meta device")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = Encoder(arch=name, overrides=overrides or None)
    if weights is not None:
        load_weights(model, weights)
    return model
