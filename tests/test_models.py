import json

import pytest
import torch

import eupe
from eupe.cli import main
from eupe.models import STUDENTS, ZOO, count_params, create_model

from .conftest import OFFICIAL_MODELS, official_outputs


@pytest.mark.parametrize("name", OFFICIAL_MODELS)
def test_official_parity(name, official_pth):
    model = create_model(name, weights=official_pth[name]).eval()
    ref = official_outputs(name)
    with torch.no_grad():
        out = model(ref["input"])
    assert (out.cls - ref["cls"]).abs().max() < 1e-4
    assert (out.patches - ref["patch"]).abs().max() < 1e-4
    if "storage" in ref:
        assert out.registers is not None and (out.registers - ref["storage"]).abs().max() < 1e-4
    else:
        assert out.registers is None
    b, _, h, w = ref["input"].shape
    assert out.grid == (h // model.stride, w // model.stride)
    assert out.patches.shape == (b, out.grid[0] * out.grid[1], model.embed_dim)


OFFICIAL_COUNTS = {  # exact where the issue gives an exact count, else to the quoted 0.01M
    "eupe_vitt16": 5_492_160,
    "eupe_vits16": 21_601_152,
    "eupe_convnext_tiny": 27_820_128,
    "eupe_vitb16": 85.67e6,
    "eupe_convnext_small": 49.45e6,
    "eupe_convnext_base": 87.57e6,
}


@pytest.mark.parametrize("name", STUDENTS)
def test_param_counts(name):
    n = count_params(create_model(name, device="meta"))
    expected = OFFICIAL_COUNTS[name]
    if isinstance(expected, int):
        assert n == expected
    else:
        assert round(n / 1e4) * 1e4 == pytest.approx(expected, abs=1e4 + 1)


def test_proxy_builds_on_meta_without_memory():
    model = create_model("eupe_proxy_g16", device="meta")
    assert all(p.is_meta for p in model.parameters())
    blk = model.backbone.blocks[0]
    assert (model.embed_dim, len(model.backbone.blocks), blk.attn.num_heads) == (1536, 50, 16)
    assert blk.mlp.fc1.out_features == 8960 and model.num_registers == 4
    assert 1.8e9 < count_params(model) < 1.95e9


@pytest.mark.parametrize("name", ["eupe_vitt16", "eupe_convnext_tiny"])
def test_non_square_and_stride_check(name):
    model = create_model(name).eval()
    s = model.stride
    with torch.no_grad():
        out = model(torch.randn(1, 3, 3 * s, 5 * s))
    assert out.grid == (3, 5) and out.patches.shape[1] == 15 and out.cls.shape == (1, model.embed_dim)
    with pytest.raises(ValueError, match="multiples of its stride"):
        model(torch.randn(1, 3, 3 * s + 1, 5 * s))


def test_save_pretrained_roundtrip(tmp_path):
    model = create_model("eupe_vitt16", drop_path_rate=0.1).eval()
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"config.json", "model.safetensors"}
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["arch"] == "eupe_vitt16" and config["overrides"] == {"drop_path_rate": 0.1}
    x = torch.randn(1, 3, 32, 48)
    for loaded in (
        create_model(tmp_path / "m"),
        eupe.Encoder.from_pretrained(str(tmp_path / "m")),
        create_model("eupe_vitt16", weights=tmp_path / "m"),
    ):
        loaded.eval()
        with torch.no_grad():
            assert torch.equal(loaded(x).patches, model(x).patches)


def _one_line_error(fn):
    with pytest.raises(eupe.CheckpointError) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_load_errors_are_one_line(tmp_path, official_pth):
    src = official_pth["eupe_vitt16"].read_bytes()
    (tmp_path / "trunc.pth").write_bytes(src[: len(src) // 2])
    msg = _one_line_error(lambda: create_model("eupe_vitt16", weights=tmp_path / "trunc.pth"))
    assert "trunc.pth" in msg and "not a readable checkpoint" in msg

    msg = _one_line_error(lambda: create_model("eupe_vitt16", weights=official_pth["eupe_vits16"]))
    assert "eupe_vitt16" in msg and "shape mismatches" in msg and "patch_embed.proj.weight" in msg

    msg = _one_line_error(lambda: create_model("eupe_vitt16", weights=official_pth["eupe_convnext_tiny"]))
    assert "eupe_vitt16" in msg and "official ConvNeXt" in msg

    (tmp_path / "notes.txt").write_text("not a checkpoint")
    msg = _one_line_error(lambda: create_model("eupe_vitt16", weights=tmp_path / "notes.txt"))
    assert "notes.txt" in msg

    _one_line_error(lambda: create_model("eupe_vitt16", weights=tmp_path / "missing.pth"))
    _one_line_error(lambda: create_model("no_such_model"))

    state = torch.load(official_pth["eupe_vitt16"], weights_only=True)
    del state["blocks.3.mlp.fc1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    msg = _one_line_error(lambda: create_model("eupe_vitt16", weights=tmp_path / "partial.pth"))
    assert "blocks.3.mlp.fc1.weight" in msg


def _truncated_safetensors(path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-1000])


@pytest.mark.parametrize(
    "filename,make,reason",
    [
        ("cut.safetensors", _truncated_safetensors, "truncated safetensors file"),
        (
            "notes.pth",
            lambda p: p.write_text("these are my notes\nnot weights\n"),
            "a text file, not a checkpoint",
        ),
        ("noise.pth", lambda p: p.write_bytes(bytes(range(256)) * 8), "not a PyTorch or safetensors file"),
        (
            "noise.safetensors",
            lambda p: p.write_bytes(bytes(range(255, -1, -1)) * 8),
            "corrupt safetensors file",
        ),
    ],
)
def test_unreadable_weights_name_the_file_and_the_expected_model(tmp_path, filename, make, reason):
    path = tmp_path / filename
    make(path)
    msg = _one_line_error(lambda: create_model("eupe_vitt16", weights=path))
    prefix = f"{path}: not a readable checkpoint for eupe_vitt16 (timm vit_tiny_patch16_dinov3_qkvb): "
    assert msg.startswith(prefix) and reason in msg, msg
    assert len(msg) - len(prefix) < 60, msg  # a few words, not PyTorch's whole explanation
    # the same for a timm teacher's checkpoint
    from eupe.teachers.timm_teacher import TimmTeacher

    msg = _one_line_error(
        lambda: TimmTeacher("vit_small_patch16_dinov3", checkpoint=str(path), pretrained=False)
    )
    assert (
        msg.startswith(f"{path}: not a readable checkpoint for timm model vit_small_patch16_dinov3")
        and reason in msg
    )


def test_weights_only_refuses_pickled_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": Evil()}))
    _one_line_error(lambda: create_model("eupe_vitt16", weights=tmp_path / "evil.pth"))


def test_cli_models(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(ZOO)
    row = {r["name"]: r for r in rows}["eupe_vitt16"]
    assert (row["params"], row["stride"], row["embed_dim"], row["registers"]) == (5_492_160, 16, 192, 4)
    assert main(["models"]) == 0
    assert "eupe_convnext_base" in capsys.readouterr().out
