"""Zero-shot with the paper's PE-core teacher, on a real open_clip PE-core architecture (random weights).

The text tower is open_clip's own PE-Core config (PE-Core-T-16-384: the timm PE-core trunk with
attention pooling and its projection as the trunk's `head`) with the text side and the embedding
width shrunk, built offline with pretrained=None; nothing is mocked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import eupe.eval as ev
from eupe.errors import ConfigError
from eupe.eval.models import EvalModel, load_model
from eupe.eval.templates import OPENAI_IMAGENET_TEMPLATES, resolve_templates

from .test_eval_data import ColorEncoder, make_class_folders

open_clip = pytest.importorskip("open_clip")

EMBED = 16  # text-space width of the shrunk model (PE-Core-G: 1280)
TRUNK = "vit_pe_core_tiny_patch16_384"  # pooled width 192 (PE-Core-G: 1536)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pe_core(tmp_path_factory):
    """(config .json path, weights file, model) of a small PE-core CLIP built from open_clip's config."""
    root = tmp_path_factory.mktemp("pe_core")
    src = Path(open_clip.__file__).parent / "model_configs" / "PE-Core-T-16-384.json"
    cfg = json.loads(src.read_text())
    assert cfg["vision_cfg"]["timm_model_name"] == TRUNK and cfg["vision_cfg"]["timm_proj"] is None
    cfg["embed_dim"] = EMBED
    cfg["text_cfg"].update(width=32, heads=2, layers=1, context_length=16)
    path = root / "eupe-test-pe-core.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(path))
    torch.manual_seed(0)
    model = open_clip.create_model("eupe-test-pe-core", pretrained=None).eval()
    weights = root / "pe_core.pt"
    torch.save(model.state_dict(), weights)
    return path, weights, model


def test_pe_core_image_tower_has_its_projection_in_the_timm_trunk(pe_core):
    _, _, clip = pe_core
    assert getattr(clip.visual, "proj", None) is None  # what the old code looked for
    assert isinstance(clip.visual.trunk.head, torch.nn.Linear)
    assert (clip.visual.trunk.head.in_features, clip.visual.trunk.head.out_features) == (192, EMBED)


def test_projecting_the_pooled_teacher_output_gives_pe_cores_image_embedding(pe_core, tmp_path):
    """A PE-core teacher distilled before its projection (summary=head): the text tower's
    projection applied at evaluation must give exactly PE-core's image embedding, which is what
    summary=proj (the `pe_core_g` preset) distils."""
    from eupe.eval.zeroshot import to_text_space
    from eupe.teachers.timm_teacher import TimmTeacher

    _, _, clip = pe_core
    trunk_file = tmp_path / "trunk.safetensors"
    save_file({k: v.contiguous() for k, v in clip.visual.trunk.state_dict().items()}, str(trunk_file))
    pooled_teacher = TimmTeacher(TRUNK, checkpoint=str(trunk_file), pretrained=False, summary="head")
    proj_teacher = TimmTeacher(
        TRUNK, checkpoint=str(trunk_file), pretrained=False, summary="proj", kwargs={"num_classes": EMBED}
    )
    assert (pooled_teacher.cls_dim, proj_teacher.cls_dim) == (192, EMBED)
    x = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = clip.encode_image(x)
        pooled = pooled_teacher.encode(x).cls
        projected = proj_teacher.encode(x).cls
    out, used = to_text_space(pooled, clip, EMBED)
    assert used and out.shape == (2, EMBED)
    assert torch.allclose(out, reference, atol=1e-5) and torch.allclose(projected, reference, atol=1e-5)
    same, used = to_text_space(projected, clip, EMBED)  # already in the text space
    assert not used and same is projected
    same, used = to_text_space(pooled, clip, EMBED, mode="no")
    assert not used and same is pooled
    forced, used = to_text_space(pooled, clip, EMBED, mode="yes")
    assert used and torch.allclose(forced, reference, atol=1e-5)
    with pytest.raises(ConfigError, match="visual_projection=yes"):  # PE-core has no 16 -> 16 map
        to_text_space(projected, clip, EMBED, mode="yes")


def test_zeroshot_end_to_end_with_a_pe_core_text_tower(pe_core, tmp_path):
    from eupe.eval.knn import classification_transform, extract_cls
    from eupe.eval.zeroshot import open_clip_text_tower, text_classifier
    from eupe.models.heads import TeacherHeads
    from eupe.models.teacher_norm import TeacherNorm

    cfg_path, weights, _ = pe_core
    make_class_folders(tmp_path / "data", classes=6, per_class=3)
    names = ["red", "green", "yellow", "blue", "orange", "purple"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    text, tok = open_clip_text_tower(str(cfg_path), str(weights))
    classifier = text_classifier(text, tok, names, list(OPENAI_IMAGENET_TEMPLATES))  # the default
    # a student whose pe_core_g head predicts TeacherNorm-normalized 192-d pooled features (the
    # preset's summary=head), fitted so that PE-core's projection lands on the right class
    model = load_model(ColorEncoder(), device="cpu")
    train = ev.datasets.ClassFolder(tmp_path / "data" / "train")
    feats, labels = extract_cls(model, train, classification_transform(model, 32, 32), 64, 0, "fit")
    heads = TeacherHeads(16, {"pe_core_g": (192, 192)}, hidden_dim=32)
    norm = TeacherNorm({"pe_core_g": (192, 192)})
    g = torch.Generator().manual_seed(0)
    mean, std = norm.stats("pe_core_g", "cls")
    mean.copy_(torch.randn(192, generator=g))
    std.copy_(10 ** (torch.rand(192, generator=g) - 0.5))
    proj = text.visual.trunk.head
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for _ in range(100):
        emb = proj(heads.cls["pe_core_g"](feats) * std + mean)
        loss = F.cross_entropy(100 * F.normalize(emb, dim=-1) @ classifier.T, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    heads.save(tmp_path), norm.save(tmp_path)
    student = EvalModel(**{**model.__dict__, "heads_dir": tmp_path})
    common = dict(text_model=str(cfg_path), text_weights=str(weights), classnames=str(tmp_path / "names.txt"))
    common.update(resolution=32, resize=32, num_workers=0, device="cpu", teacher="pe_core_g")
    r = ev.zeroshot(student, tmp_path / "data", output_dir=tmp_path / "out", **common)
    assert r.status == "ok" and r.value == pytest.approx(1.0), r
    assert r.extra["visual_projection"] is True and r.extra["num_templates"] == 80
    assert r.settings["templates"] == "openai_imagenet"
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["value"] == pytest.approx(1.0)
    # without the projection the 192-d head cannot meet the 16-d text space: a one-line error
    with pytest.raises(ConfigError, match="192 dims .* embeds 16"):
        ev.zeroshot(student, tmp_path / "data", visual_projection="no", **common)


def test_template_sets_and_files(tmp_path):
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 and len(set(OPENAI_IMAGENET_TEMPLATES)) == 80
    assert all("{}" in t for t in OPENAI_IMAGENET_TEMPLATES)
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as theirs

    assert list(OPENAI_IMAGENET_TEMPLATES) == [t("{}") for t in theirs]  # the well-known list, in order
    assert resolve_templates("openai_imagenet") == list(OPENAI_IMAGENET_TEMPLATES)
    assert resolve_templates("simple") == ["a photo of a {}."]
    (tmp_path / "t.txt").write_text("a photo of a {}.\n\n  itap of a {}.  \n")
    assert resolve_templates(str(tmp_path / "t.txt")) == ["a photo of a {}.", "itap of a {}."]
    assert resolve_templates(["x {} y"]) == ["x {} y"]
    (tmp_path / "bad.txt").write_text("a photo of a cat.\n")
    with pytest.raises(ConfigError, match="has no '\\{\\}'"):
        resolve_templates(str(tmp_path / "bad.txt"))
    with pytest.raises(ConfigError, match="openai_imagenet, simple"):
        resolve_templates("fancy")
