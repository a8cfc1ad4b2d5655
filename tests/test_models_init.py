"""Mimetic attention init: the products it promises, unchanged architecture, seeded, ViT only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eupe.distill.config import StudentConfig, load_config
from eupe.distill.stages import build_student
from eupe.errors import ConfigError
from eupe.models import create_model, mimetic_init_


def _products(model, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    attn = model.backbone.blocks[block].attn
    w = attn.qkv.weight.detach()
    dim, hd = w.shape[1], w.shape[1] // attn.num_heads
    qk = w[:hd].T @ w[dim : dim + hd]  # head 0: W_q^T W_k
    vo = w[2 * dim :].T @ attn.proj.weight.detach().T  # W_v^T W_o^T
    return qk, vo


def test_mimetic_products_lean_to_plus_and_minus_identity():
    torch.manual_seed(0)
    model = create_model("eupe_vitt16")
    keys = {k: v.shape for k, v in model.state_dict().items()}
    qk0, vo0 = _products(model)
    assert abs(float(qk0.diagonal().mean())) < 0.05 and abs(float(vo0.diagonal().mean())) < 0.05
    mimetic_init_(model, torch.Generator().manual_seed(1))
    qk, vo = _products(model)
    assert float(qk.diagonal().mean()) > 0.2  # rank-64 part of 0.7 Z + 0.7 I
    off = vo - torch.diag(vo.diagonal())
    assert float(vo.diagonal().mean()) < -0.35 and float(off.abs().mean()) < 0.05
    assert {k: v.shape for k, v in model.state_dict().items()} == keys  # checkpoint format unchanged
    assert float(model.backbone.blocks[5].gamma_1.detach().mean()) == 1.0  # layer scale no longer 1e-5


def test_mimetic_is_seeded_and_only_for_vits():
    a, b = create_model("eupe_vitt16"), create_model("eupe_vitt16")
    mimetic_init_(a, torch.Generator().manual_seed(3))
    mimetic_init_(b, torch.Generator().manual_seed(3))
    for x, y in zip(a.backbone.blocks, b.backbone.blocks):
        assert torch.equal(x.attn.qkv.weight, y.attn.qkv.weight)
        assert torch.equal(x.attn.proj.weight, y.attn.proj.weight)
    with pytest.raises(ConfigError, match="ViT"):
        mimetic_init_(create_model("eupe_convnext_tiny"))


@pytest.mark.parametrize(
    "overrides", [["student.init=/some/final"], ["student.name=eupe_convnext_tiny", "student.resolution=256"]]
)
def test_distill_student_mimetic_option(overrides):
    torch.manual_seed(0)
    student = build_student(StudentConfig(name="eupe_vitt16", mimetic_init=True))
    assert float(_products(student)[1].diagonal().mean()) < -0.35
    with pytest.raises(ConfigError, match="student.mimetic_init"):
        load_config(
            Path(__file__).parents[1] / "configs/tiny/stage2.yaml", ["student.mimetic_init=true", *overrides]
        )
