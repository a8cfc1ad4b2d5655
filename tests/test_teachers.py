"""Teacher backends: timm (ViT/PE/CNN, summaries, checkpoints), presets on meta, ONNX, eupe checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from eupe.errors import CheckpointError, ConfigError
from eupe.teachers import (
    PRESETS,
    TeacherSpec,
    TimmTeacher,
    apply_preset,
    build_teacher_from_spec,
    known_teachers,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}
CONVNEXT = {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)}
DINO = TeacherSpec(model="vit_small_patch16_dinov3", pretrained=False, kwargs=TINY, resolution=32)
PE = TeacherSpec(
    model="vit_pe_core_tiny_patch16_384", pretrained=False, kwargs=TINY, resolution=32, summary="head"
)


def _views(n: int = 2, side: int = 40) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0))


def _check(teacher, out, side: int) -> None:
    grid = side // teacher.stride
    assert out.cls.shape == (2, teacher.cls_dim) and out.patches.shape == (2, grid * grid, teacher.patch_dim)
    assert out.grid == (grid, grid) and out.registers is None
    assert not out.cls.requires_grad and out.cls.dtype == torch.float32


@pytest.mark.parametrize(
    "spec",
    [
        DINO,
        dataclasses.replace(DINO, summary="mean"),
        dataclasses.replace(DINO, kwargs={**TINY, "depth": 3}, summary="block:1", patches="block:-2"),
        PE,
        dataclasses.replace(PE, summary="proj"),
        dataclasses.replace(PE, summary="block:0"),
        TeacherSpec(model="convnext_atto", pretrained=False, resolution=64, summary="head", kwargs=CONVNEXT),
        TeacherSpec(model="resnet10t", pretrained=False, resolution=64, summary="mean", patches="block:2"),
    ],
    ids=[
        "dino-cls",
        "dino-mean",
        "dino-blocks",
        "pe-head",
        "pe-proj",
        "pe-block",
        "convnext",
        "resnet-block",
    ],
)
def test_timm_teacher_shapes(spec: TeacherSpec) -> None:
    teacher = build_teacher_from_spec("t", spec)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    _check(teacher, teacher(_views()), teacher.resolution)
    side = teacher.resolution + teacher.stride * 2  # another pyramid scale: dynamic input size
    _check(teacher, teacher(_views(), resolution=side), side)


def test_timm_summaries_mean_what_they_say() -> None:
    teacher = build_teacher_from_spec("t", dataclasses.replace(DINO, kwargs={**TINY, "depth": 3}))
    images = teacher.prepare(_views())
    tokens = teacher.model.forward_features(images)
    out = teacher.encode(images)
    assert torch.allclose(out.cls, tokens[:, 0]) and torch.allclose(out.patches, tokens[:, 5:])  # cls + 4 reg
    mean_t = TimmTeacher(
        DINO.model, pretrained=False, kwargs={**TINY, "depth": 3}, resolution=32, summary="mean"
    )
    mean_t.model.load_state_dict(teacher.model.state_dict())
    assert torch.allclose(mean_t.encode(images).cls, tokens[:, 5:].mean(1), atol=1e-6)
    pe = build_teacher_from_spec("pe", PE)
    pe_images = pe.prepare(_views())
    pooled = pe.model.attn_pool(pe.model.forward_features(pe_images))  # PE: attention-pooled head output
    assert torch.allclose(pe.encode(pe_images).cls, pooled, atol=1e-5)


def test_timm_teacher_errors() -> None:
    siglip = TeacherSpec(model="vit_base_patch16_siglip_224", pretrained=False, kwargs=TINY, resolution=32)
    with pytest.raises(ConfigError, match="no class token"):
        build_teacher_from_spec("siglip", dataclasses.replace(siglip, summary="cls"))
    assert build_teacher_from_spec("siglip", dataclasses.replace(siglip, summary="head")).cls_dim == 32
    with pytest.raises(ConfigError, match="unknown timm model"):
        build_teacher_from_spec("x", TeacherSpec(model="not_a_model_xyz"))
    with pytest.raises(ConfigError, match="not a preset"):
        build_teacher_from_spec("mystery", TeacherSpec())
    with pytest.raises(ConfigError, match="backend"):
        build_teacher_from_spec("x", TeacherSpec(backend="tensorflow", model="m"))
    with pytest.raises(ConfigError, match="multiples of its patch size 16; got resolution=40"):
        build_teacher_from_spec("x", dataclasses.replace(DINO, resolution=40))
    with pytest.raises(ConfigError, match="block:N"):
        build_teacher_from_spec("x", dataclasses.replace(DINO, patches="layer4"))


def test_seeded_init_and_local_checkpoint(tmp_path: Path) -> None:
    a, b = build_teacher_from_spec("a", DINO, seed=1), build_teacher_from_spec("a", DINO, seed=1)
    other = build_teacher_from_spec("b", DINO, seed=1)  # another teacher key: another init
    x = _views()
    assert torch.equal(a(x).patches, b(x).patches) and not torch.equal(a(x).patches, other(x).patches)
    sd = {k: v.contiguous() for k, v in other.model.state_dict().items()}
    sd["head.weight"] = torch.zeros(10, 32)  # a classifier the teacher does not use is dropped
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = build_teacher_from_spec("a", dataclasses.replace(DINO, checkpoint=str(tmp_path / name)))
        assert torch.equal(loaded(x).patches, other(x).patches)
    bad = {k: v for k, v in sd.items() if "blocks.1." not in k}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        build_teacher_from_spec("a", dataclasses.replace(DINO, checkpoint=str(tmp_path / "bad.safetensors")))


def test_norm_and_bf16_from_spec() -> None:
    assert build_teacher_from_spec("pe", PE).mean.flatten().tolist() == [0.5, 0.5, 0.5]
    dino = build_teacher_from_spec("d", DINO)
    assert torch.allclose(dino.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    custom = build_teacher_from_spec(
        "d", dataclasses.replace(DINO, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    )
    assert custom.std.flatten().tolist() == [1.0, 1.0, 1.0]
    bf16 = build_teacher_from_spec("d", dataclasses.replace(DINO, dtype="bf16"))
    ref = build_teacher_from_spec("d", DINO)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}  # half the memory
    assert all(b.dtype == torch.float32 for b in bf16.buffers() if b.is_floating_point())  # RoPE, mean/std
    out, ref_out = bf16(_views()), ref(_views())
    assert out.cls.dtype == torch.float32 and not torch.equal(out.cls, ref_out.cls)
    assert torch.nn.functional.cosine_similarity(out.patches, ref_out.patches, dim=-1).min() > 0.98


PAPER = {  # preset: (resolution, stride, cls_dim, patch_dim)
    "pe_core_g": (448, 14, 1280, 1536),  # cls: the projected image embedding
    "pe_lang_g": (448, 14, 1536, 1536),
    "dinov3_hplus": (256, 16, 1280, 1280),
    "siglip2_g": (384, 16, 1536, 1536),
    "dinov3_7b": (256, 16, 4096, 4096),
}


def test_presets_on_meta_device() -> None:
    assert set(known_teachers()) == set(PAPER) == set(PRESETS)
    big = build_teacher_from_spec("dinov3_7b", TeacherSpec(pretrained=False, dtype="bf16"), device="meta")
    assert big.model.cls_token.is_meta and sum(p.numel() for p in big.parameters()) > 6e9
    with torch.device("meta"):
        for name, (res, stride, cls_dim, patch_dim) in PAPER.items():
            t = build_teacher_from_spec(name, TeacherSpec(pretrained=False))
            assert (t.resolution, t.stride, t.cls_dim, t.patch_dim) == (res, stride, cls_dim, patch_dim), name
            if name in ("pe_core_g", "dinov3_hplus"):  # a meta forward (~1 s each) confirms the widths
                out = t.encode(torch.empty(1, 3, res, res))
                assert out.cls.shape == (1, cls_dim) and out.patches.shape == (
                    1,
                    (res // stride) ** 2,
                    patch_dim,
                )
            if name == "pe_core_g":
                assert t.summary == "proj" and t.model.num_prefix_tokens == 0
        with pytest.raises(
            ConfigError, match=r"teacher 'pe_core_g' expects 448x448 input; got resolution=450"
        ):
            build_teacher_from_spec("pe_core_g", TeacherSpec(pretrained=False, resolution=450))


def test_apply_preset_fills_only_unset_fields() -> None:
    spec = apply_preset("dinov3_hplus", TeacherSpec(checkpoint="w.pth", resolution=512))
    assert spec.model == "vit_huge_plus_patch16_dinov3" and spec.resolution == 512 and spec.summary == "cls"
    assert (
        apply_preset("dinov3_hplus", TeacherSpec(model="resnet18")).summary == ""
    )  # another model: no preset


def test_offline_hub_fetch_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network
    with pytest.raises(CheckpointError, match="pass checkpoint="):
        build_teacher_from_spec(
            "d", TeacherSpec(model="vit_small_patch16_dinov3", kwargs=TINY, resolution=32)
        )


class _TinyCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.mid, self.last = (
            nn.Conv2d(3, 8, 3, 2, 1),
            nn.Conv2d(8, 16, 3, 2, 1),
            nn.Conv2d(16, 24, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.mid(torch.relu(self.stem(x))))).mean(dim=(2, 3))


@pytest.mark.filterwarnings(
    "ignore::DeprecationWarning"
)  # the small, fast TorchScript exporter is enough here
def test_onnx_teacher_intermediate_tensor(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    net = _TinyCnn().eval()
    path = tmp_path / "tiny.onnx"
    with torch.no_grad():
        torch.onnx.export(
            net,
            (torch.zeros(1, 3, 32, 32),),
            str(path),
            input_names=["image"],
            output_names=["embedding"],
            dynamic_axes={"image": {0: "batch"}},
            dynamo=False,
        )
    mid = next(o for n in onnx.load(str(path)).graph.node if n.name.startswith("/mid/") for o in n.output)
    teacher = build_teacher_from_spec(
        "expert", TeacherSpec(backend="onnx", model=str(path), patches=mid, summary="embedding")
    )
    assert (teacher.resolution, teacher.stride, teacher.cls_dim, teacher.patch_dim) == (32, 4, 24, 16)
    views = _views(3, 48)
    out = teacher(views)
    images = teacher.prepare(views)
    with torch.no_grad():
        fmap = net.mid(torch.relu(net.stem(images)))
        ref_cls = net(images)
    assert out.grid == (8, 8)
    assert torch.allclose(out.patches, fmap.flatten(2).transpose(1, 2), atol=1e-5)
    assert torch.allclose(out.cls, ref_cls, atol=1e-5)
    pooled = build_teacher_from_spec("expert", TeacherSpec(backend="onnx", model=str(path), patches=mid))
    assert torch.allclose(
        pooled(views).cls, fmap.flatten(2).mean(-1), atol=1e-5
    )  # no cls output: mean-pooled
    bgr_spec = TeacherSpec(backend="onnx", model=str(path), patches=mid, kwargs={"channel_order": "BGR"})
    with torch.no_grad():
        bgr_map = net.mid(torch.relu(net.stem(images.flip(1))))  # OpenCV-trained experts want BGR
    assert torch.allclose(build_teacher_from_spec("e", bgr_spec)(views).patch_map(), bgr_map, atol=1e-5)
    with pytest.raises(ConfigError, match="no tensor named"):
        build_teacher_from_spec("expert", TeacherSpec(backend="onnx", model=str(path), patches="nope"))


def test_eupe_teacher_from_trained_folder(tmp_path: Path) -> None:
    import eupe

    torch.manual_seed(0)
    student = eupe.create_model("eupe_vitt16")
    student.save_pretrained(tmp_path / "final")
    teacher = build_teacher_from_spec(
        "proxy", TeacherSpec(backend="eupe", checkpoint=str(tmp_path / "final"))
    )
    assert (teacher.resolution, teacher.stride, teacher.cls_dim) == (256, 16, student.embed_dim)
    views = _views(2, 64)
    out = teacher(views, resolution=64)
    ref = student.eval()(teacher.prepare(views, 64))
    assert torch.allclose(out.cls, ref.cls, atol=1e-5) and torch.allclose(out.patches, ref.patches, atol=1e-5)
    assert teacher.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    with pytest.raises(ConfigError, match="does not exist"):
        build_teacher_from_spec("proxy", TeacherSpec(backend="eupe", checkpoint=str(tmp_path / "nope")))


@pytest.mark.parametrize(
    ("zoo_name", "timm_name"),
    [("eupe_vitt16", "vit_tiny_patch16_dinov3_qkvb"), ("eupe_convnext_tiny", "convnext_tiny")],
)
def test_timm_teacher_reads_official_layout(official_pth, zoo_name: str, timm_name: str) -> None:
    """Meta's key layout goes through timm's own checkpoint filter; outputs equal our encoder's."""
    import eupe

    teacher = TimmTeacher(timm_name, checkpoint=str(official_pth[zoo_name]), resolution=64)
    reference = eupe.create_model(zoo_name, weights=official_pth[zoo_name]).eval()
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out, ref = teacher.encode(images), reference(images)
    assert torch.allclose(out.cls, ref.cls, atol=1e-5) and torch.allclose(out.patches, ref.patches, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_teacher_with_external_weights(tmp_path: Path) -> None:
    """Large experts keep weights in external files; the edited graph must still find them."""
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    net = _TinyCnn().eval()
    plain = tmp_path / "plain.onnx"
    with torch.no_grad():
        torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(plain), input_names=["image"], dynamo=False)
    model = onnx.load(str(plain))
    (tmp_path / "ext").mkdir()
    onnx.save_model(
        model,
        str(tmp_path / "ext" / "m.onnx"),
        save_as_external_data=True,
        location="w.bin",
        size_threshold=0,
    )
    mid = next(o for n in model.graph.node if n.name.startswith("/mid/") for o in n.output)
    spec = TeacherSpec(backend="onnx", model=str(tmp_path / "ext" / "m.onnx"), patches=mid)
    ext = build_teacher_from_spec("e", spec)
    ref = build_teacher_from_spec("e", dataclasses.replace(spec, model=str(plain)))
    views = _views(1, 32)
    assert torch.equal(ext(views).patches, ref(views).patches)


class _TinyTokens(nn.Module):
    """A ViT-shaped output: a class token, then one token per 8x8 patch, as [B, 1 + N, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 12, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1) + tokens.mean(1, keepdim=True), tokens], dim=1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_teacher_takes_the_class_token_of_a_token_sequence(tmp_path: Path) -> None:
    """summary='cls': the first token of a [B, 1 + N, C] output (e.g. an exported DINOv2 ViT)."""
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    net = _TinyTokens().eval()
    path = tmp_path / "tokens.onnx"
    with torch.no_grad():
        torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["image"], dynamo=False)
    spec = TeacherSpec(backend="onnx", model=str(path), summary="cls", kwargs={"num_prefix": 1})
    teacher = build_teacher_from_spec("vit", spec)
    views = _views(2, 32)
    out = teacher(views)
    with torch.no_grad():
        ref = net(teacher.prepare(views))
    assert out.grid == (4, 4) and teacher.cls_dim == 12
    assert torch.allclose(out.cls, ref[:, 0], atol=1e-5) and torch.allclose(
        out.patches, ref[:, 1:], atol=1e-5
    )
    with pytest.raises(ConfigError, match="num_prefix >= 1"):
        build_teacher_from_spec("vit", TeacherSpec(backend="onnx", model=str(path), summary="cls"))
