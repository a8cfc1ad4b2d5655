"""`eupe plan`: measured FLOPs equal hand-counted ones on tiny models, and the memory/time formulas
behave (FSDP shards by N, checkpointing cuts activations, days = FLOPs / (N * peak * MFU))."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import eupe.distill.plan.measure as plan_measure
from eupe.cli import main
from eupe.distill.plan import (
    GPUS,
    NetSpec,
    PlanSpec,
    heads_forward_flops,
    heads_params,
    load_plan_spec,
    measure_costs,
    memory,
    plan,
)
from eupe.distill.plan.report import format_plan
from eupe.errors import ConfigError
from eupe.models.heads import TeacherHeads

# A 1-block timm ViT teacher (D=32, MLP 128, patch 16, 1 cls token) and a 1-block ViT-T student
# (D=192, MLP 768, patch 16, cls + 4 registers), both at 32 px: 2x2 patches.
TEACHER = NetSpec("timm", "vit_small_patch16_224", [32], {"depth": 1, "embed_dim": 32, "num_heads": 2})
STUDENT = NetSpec("eupe", "eupe_vitt16", [32], {"depth": 1})


def vit_forward_flops(d: int, mlp: int, tokens: int, patches: int, patch: int = 16) -> int:
    """Hand count, 2 FLOPs per multiply-add: patch conv + qkv + QK^T and AV + proj + MLP."""
    conv = 2 * patches * 3 * patch * patch * d
    return conv + 2 * tokens * d * 3 * d + 4 * tokens * tokens * d + 2 * tokens * d * d + 4 * tokens * d * mlp


def tiny_spec(**kw) -> PlanSpec:
    args = dict(
        name="tiny", student=STUDENT, teachers={"t": TEACHER}, hidden_dim=64, global_batch=8, max_steps=10
    )
    return PlanSpec(**{**args, **kw})


@pytest.fixture(scope="module")
def tiny_costs():
    return measure_costs(tiny_spec())


def test_measured_flops_equal_hand_count(tiny_costs):
    t, s = tiny_costs["t"], tiny_costs["student"]
    assert t.tokens(32) == 5 and s.tokens(32) == 9  # (32/16)^2 + prefix
    assert t.fwd_flops[32] == vit_forward_flops(32, 128, tokens=5, patches=4) == 322_688
    assert s.fwd_flops[32] == vit_forward_flops(192, 768, tokens=9, patches=4) == 9_204_480
    assert t.flops_method == "FlopCounterMode(meta)"


def test_heads_formula_matches_module():
    dims = {"a": (48, 32), "b": (16, 24)}
    with torch.device("meta"):
        heads = TeacherHeads(40, dims, 64)
    assert heads_params(40, 64, list(dims.values())) == sum(p.numel() for p in heads.parameters())
    cls, patches = torch.empty(1, 40, device="meta"), torch.empty(1, 7, 40, device="meta")
    with FlopCounterMode(display=False) as counter:
        for name in dims:
            heads.cls[name](cls), heads.patch[name](patches)
    assert counter.get_total_flops() == heads_forward_flops(40, 64, list(dims.values()), 7)


def test_step_flops_time_and_images_follow_the_formulas(tiny_costs):
    p = plan(tiny_spec(), gpus=2, gpu="a100", mfu=0.5, costs=tiny_costs, dataset_size=40)
    f = p["flops"]
    s, t = tiny_costs["student"], tiny_costs["t"]
    heads = heads_forward_flops(192, 64, [(t.cls_dim, 32)], 4)
    per_image = t.fwd_flops[32] + 3 * s.fwd_flops[32] + 3 * heads
    assert f["per_image_model"] == pytest.approx(per_image)
    assert f["per_step"] == pytest.approx(8 * per_image)
    assert f["total"] == pytest.approx(80 * per_image)
    assert p["time"]["days"] == pytest.approx(80 * per_image / (2 * 312e12 * 0.5) / 86400)
    assert p["images"]["seen"] == 80 and p["images"]["epochs"] == 2.0
    ckpt = plan(tiny_spec(), gpus=2, checkpointing=True, costs=tiny_costs)["flops"]
    assert ckpt["per_step"] == pytest.approx(f["per_step"] + 8 * s.fwd_flops[32])  # one recompute


def test_pyramid_cost_is_the_mean_over_draws():
    spec = tiny_spec(
        student=NetSpec("eupe", "eupe_vitt16", [32, 64], {"depth": 1}),
        teachers={"t": NetSpec(TEACHER.backend, TEACHER.model, [32, 64], TEACHER.kwargs)},
    )
    costs = measure_costs(spec)
    t = costs["t"]
    assert t.fwd_flops[64] == vit_forward_flops(32, 128, tokens=17, patches=16)
    p = plan(spec, gpus=1, costs=costs)
    assert p["flops"]["per_image"]["teacher t forward"] == pytest.approx(
        (t.fwd_flops[32] + t.fwd_flops[64]) / 2
    )
    # peak memory comes from the largest draw
    assert memory(spec, costs, 1, 1, False, False)["activations"] > 0


@pytest.fixture(scope="module")
def deep_spec_costs():
    spec = tiny_spec(student=NetSpec("eupe", "eupe_vitt16", [64], {"depth": 4}))
    return spec, measure_costs(spec)


def test_fsdp_shards_student_state_by_n_and_teachers_are_replicated(deep_spec_costs):
    spec, costs = deep_spec_costs
    ddp, fsdp = memory(spec, costs, 8, 1, False, False), memory(spec, costs, 8, 1, True, False)
    p = costs["student"].params + heads_params(192, 64, [(costs["t"].cls_dim, 32)])
    assert ddp["params"] == 4 * p and ddp["grads"] == 4 * p and ddp["optimizer"] == 8 * p
    for key in ("params", "grads", "optimizer"):
        assert fsdp[key] == pytest.approx(ddp[key] / 8)
    # the trainer replicates the frozen teachers on every rank (bf16), with or without FSDP
    assert ddp["teacher_weights"] == fsdp["teacher_weights"] == 2 * costs["t"].params
    assert ddp["comm_buffers"] == 4 * p  # DDP's fp32 gradient buckets
    assert (
        fsdp["comm_buffers"] == 8 * costs["student"].max_block_params
    )  # bf16 gather + prefetch, fp32 reduce
    assert fsdp["activations"] == ddp["activations"]  # data parallel: activations do not shard
    assert ddp["other"] == 3 * 64 * 64 * 4 + 2 * 2**30  # one fp32 input view + the CUDA/NCCL allowance


def test_checkpointing_cuts_activations_and_batch_scales_them(deep_spec_costs):
    spec, costs = deep_spec_costs
    s = costs["student"]
    assert s.num_blocks == 4
    assert 0 < s.act_ckpt_bytes[64] < 0.6 * s.act_bytes[64]
    one, four = memory(spec, costs, 1, 1, False, False), memory(spec, costs, 1, 4, False, False)
    assert four["activations"] == pytest.approx(4 * one["activations"])


def test_sizing_attention_saves_what_flash_attention_saves():
    """On the fake CPU tensors activations are measured on, attention is the CPU flash kernel: it
    saves no T x T score matrix, only q, k, v, out and the fp32 log-sum-exp (as flash attention on a
    GPU). A ViT's saved bytes per image therefore grow with T, not T^2."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = (torch.empty(2, 3, 50, 8, requires_grad=True) for _ in range(3))
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t
        ):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (2, 3, 50, 50) not in shapes and (2, 3, 50) in shapes and shapes.count((2, 3, 50, 8)) == 4


def test_activations_are_measured_as_trained():
    """Measured as the trainer trains: checkpointing keeps each block's input in the parameters'
    dtype (fp32 for DDP students, bf16 for the FSDP proxy), 2 bytes per element more for fp32."""
    ckpt = {}
    for dtype in (torch.float32, torch.bfloat16):
        cost = plan_measure.describe("s", "eupe", "eupe_vitt16", {"depth": 2})
        cost._mode = plan_measure._as_trained(cost, dtype)
        ckpt[dtype] = plan_measure.measure_activations(cost, 64)[1]
    tokens = (64 // 16) ** 2 + 5  # cls + 4 registers
    assert ckpt[torch.float32] - ckpt[torch.bfloat16] == 2 * tokens * 192 * 2  # 2 blocks


def test_flop_counter_failure_falls_back_to_formula(monkeypatch):
    class Broken(FlopCounterMode):
        def __enter__(self):
            raise RuntimeError("no meta kernel")

    monkeypatch.setattr(plan_measure, "FlopCounterMode", Broken)
    cost = plan_measure.size_model("t", "timm", TEACHER.model, [32], TEACHER.kwargs)
    assert cost.flops_method.startswith("analytic")
    assert cost.fwd_flops[32] == 2 * cost.params * 5 + 4 * 1 * 25 * 32


def test_cli_writes_json(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "stage: fixed\n"
        "teachers:\n"
        "  t: {backend: timm, model: vit_small_patch16_224, pretrained: false, resolution: 32,\n"
        "      kwargs: {depth: 1, embed_dim: 32, num_heads: 2}}\n"
        "  proxy: {backend: eupe, checkpoint: runs/nowhere/final, resolution: 32}\n"
        "student: {name: eupe_vitt16, resolution: 32, overrides: {depth: 1}}\n"
        "heads: {hidden_dim: 64}\n"
        "train: {global_batch: 8, max_steps: 10}\n"
    )
    out = tmp_path / "plan.json"
    rc = main(
        ["plan", str(cfg), "--gpus", "2", "--gpu", "h200", "--arch", "proxy=eupe_vitt16", "--json", str(out)]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["hardware"]["peak_bf16_flops"] == GPUS["h200"].peak_bf16
    assert result["parallelism"]["micro_batch"] == 4 and result["images"]["seen"] == 80
    assert result["spec"]["teachers"]["proxy"]["model"] == "eupe_vitt16"
    assert set(result["memory"]["variants"]) == {"ddp", "ddp+ckpt", "fsdp", "fsdp+ckpt"}
    printed = capsys.readouterr().out
    assert "days" in printed and "formula" in printed


def test_cli_bad_arch_is_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("student: {name: eupe_vitt16, resolution: 32}\nteachers: {t: {backend: timm, model: x}}\n")
    assert main(["plan", str(cfg), "--gpus", "1", "--arch", "proxy"]) == 2
    assert "TEACHER=ZOO_NAME" in capsys.readouterr().err


def test_paper_configs_read_as_the_paper_says():
    s1 = load_plan_spec("configs/paper/stage1_proxy.yaml")
    assert {k: (t.model, t.resolutions) for k, t in s1.teachers.items()} == {
        "pe_core_g": ("vit_pe_core_gigantic_patch14_448", [448]),
        "pe_lang_g": ("vit_pe_lang_gigantic_patch14_448", [448]),
        "dinov3_hplus": ("vit_huge_plus_patch16_dinov3", [256]),
    }
    assert s1.student.model == "eupe_proxy_g16" and s1.hidden_dim == 1536
    s3 = load_plan_spec("configs/paper/stage3_vitb16.yaml")  # student.init need not exist for a plan
    assert s3.student.resolutions == s3.teachers["proxy"].resolutions == [256, 384, 512]
    assert (s3.global_batch, s3.max_steps, s3.hidden_dim) == (4096, 100_000, 3072)
    assert s3.teachers["proxy"].model == "eupe_proxy_g16" and "does not exist" in s3.teachers["proxy"].note
    with pytest.raises(ConfigError, match="not teachers of this config"):
        load_plan_spec("configs/paper/stage2_vitb16.yaml", arch={"prxy": "eupe_vitl16"})


def test_convnext_student_is_sized_per_block():
    c = plan_measure.size_model("cnx", "eupe", "eupe_convnext_tiny", [64], trainable=True)
    assert (c.stride, c.prefix_tokens, c.patch_tokens(64), c.num_blocks) == (32, 0, 4, 18)
    assert c.fwd_flops[64] > 0 and 0 < c.act_ckpt_bytes[64] < c.act_bytes[64]


def test_family_plan_runs_the_teacher_once_for_every_student():
    """configs/tiny/family.yaml: one proxy forward per image for three students; the same students in
    three separate runs pay for the proxy three times."""
    arch = {"proxy": "eupe_vitt16"}
    family = load_plan_spec("configs/tiny/family.yaml", ["teachers.proxy.kwargs={depth: 2}"], arch)
    assert list(family.student_nets()) == ["student vitt_d1", "student vitt_d2", "student convnext"]
    costs = measure_costs(family)
    p = plan(family, gpus=1, costs=costs)
    alone = []
    for name, net in family.students.items():
        spec = dataclasses.replace(family, student=net, students={})
        alone.append(plan(spec, gpus=1, costs={"student": costs[f"student {name}"], "proxy": costs["proxy"]}))
    teacher = p["flops"]["per_image"]["teacher proxy forward"]
    separate = sum(a["flops"]["per_image_model"] for a in alone)
    assert p["flops"]["per_image_model"] == pytest.approx(separate - 2 * teacher)
    # memory: every student's weights and optimizer, the largest student's activations
    weights = [a["memory"]["variants"]["ddp"]["params"] for a in alone]
    acts = [a["memory"]["variants"]["ddp"]["activations"] for a in alone]
    assert p["memory"]["variants"]["ddp"]["params"] == pytest.approx(sum(weights))
    assert p["memory"]["variants"]["ddp"]["activations"] == pytest.approx(max(acts))
    assert "student convnext" in format_plan(p)
