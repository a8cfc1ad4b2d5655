"""Shared test helpers. Tests never download: models are tiny, random, or rebuilt from fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "eupe_official"
OFFICIAL_MODELS = ("eupe_vitt16", "eupe_vits16", "eupe_convnext_tiny")


def official_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Rebuild the official EUPE state_dict of a parity fixture (see fixtures/eupe_official/README.md)."""
    meta = json.loads((OFFICIAL / f"{name}.json").read_text())
    tensors = load_file(str(OFFICIAL / f"{name}.safetensors"))
    rng = np.random.default_rng(meta["seed"])
    state = {}
    for entry in meta["state_dict"]:
        if entry["kind"] == "buffer":
            state[entry["key"]] = tensors["buffer." + entry["key"]]
        else:
            value = rng.standard_normal(entry["shape"]).astype(np.float32) * meta["scale"] + entry["offset"]
            state[entry["key"]] = torch.from_numpy(value)
    return state


def official_outputs(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(OFFICIAL / f"{name}.safetensors"))


@pytest.fixture(scope="session")
def official_pth(tmp_path_factory) -> dict[str, Path]:
    """Official-layout `.pth` checkpoints (what Meta's release ships) for the fixture models."""
    root = tmp_path_factory.mktemp("official")
    paths = {}
    for name in OFFICIAL_MODELS:
        paths[name] = root / f"{name}.pth"
        torch.save(official_state_dict(name), paths[name])
    return paths


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: a second intra-op thread only adds spin-waiting on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
