"""Every protocol end to end through the Python API, on generated data with known answers.

`ColorEncoder` (see test_eval_data) sees exactly the colours that encode the answers, so a correct
protocol must score near-perfectly; shuffled labels must fall to chance; identical SPair pairs must
give PCK 1.0 with any encoder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eupe.eval as ev
from eupe.errors import ConfigError
from eupe.eval.models import EvalModel, load_model

from .test_eval_data import ColorEncoder, make_ade20k, make_class_folders, make_nyu, make_spair, tiny_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_knn_colour_coded_is_perfect_and_shuffled_labels_are_chance(tmp_path):
    settings = dict(resolution=32, resize=32, num_workers=0, batch_size=64, device="cpu")
    make_class_folders(tmp_path / "coded", classes=12, per_class=4)
    r = ev.knn(ColorEncoder(), tmp_path / "coded", k=[1, 3], output_dir=tmp_path / "out", **settings)
    assert r.value == pytest.approx(1.0) and r.extra["top1_by_k"]["3"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["metric"] == "top1@k=1"
    make_class_folders(tmp_path / "shuffled", classes=12, per_class=4, shuffle_train=True, seed=1)
    r = ev.knn(ColorEncoder(), tmp_path / "shuffled", k=3, **settings)
    assert r.value <= 4 / 12  # chance is 1/12; with perfect features it would be 1.0


def test_linear_seg_on_colour_coded_scenes(tmp_path):
    make_ade20k(tmp_path, n_train=4, n_val=2)
    # scale_range [1, 1] keeps the 16x16 colour blocks on the patch grid, so a linear probe on
    # block colours can be exact; no photometric distortion, which would change the colour code;
    # num_classes=4 keeps the 2-core test fast (ADE20k uses 150)
    r = ev.seg(
        ColorEncoder(),
        tmp_path,
        resolution=64,
        scale_range=[1.0, 1.0],
        photometric=False,
        num_classes=4,
        iterations=60,
        batch_size=8,
        lr=0.05,
        warmup_iters=10,
        cache_views=2,
        cache_refresh=40,
        num_workers=0,
        device="cpu",
    )
    assert r.task == "seg" and r.metric == "mIoU"
    assert r.value > 0.8 and r.extra["pixel_accuracy"] > 0.9, r.extra  # chance: ~0.25 mIoU
    assert r.extra["classes_present"] == 4
    assert r.extra["cache_seconds"] > 0 and r.extra["cache_builds"] == 2  # built, refreshed at step 40


def test_linear_depth_learns_a_known_function_of_colour(tmp_path):
    make_nyu(tmp_path, n_train=4, n_test=2)
    # native 48x64 images (NYU border crop -> 43x56), a 32x48 crop in place of 416x544, no colour
    # jitter (it would change the colour code), SigLoss's variance term from step 11
    r = ev.depth(
        ColorEncoder(),
        tmp_path,
        crop=[32, 48],
        color_aug_prob=0.0,
        sigloss_warmup=10,
        iterations=100,
        batch_size=8,
        lr=0.05,
        cache_views=2,
        num_workers=0,
        device="cpu",
    )
    gt = np.concatenate([np.asarray(x[1]).ravel() for x in ev.datasets.NYUDepth(tmp_path, "nyu_test.txt")])
    assert r.metric == "rmse" and r.value < 0.25 * gt.std(), (r.value, gt.std())  # mean guess: 1 std
    assert r.extra["delta1"] > 0.9 and r.extra["abs_rel"] < 0.1


def test_spair_identical_pairs_give_pck_one_and_random_pairs_do_not(tmp_path):
    make_spair(tmp_path / "same", identical=True)
    r = ev.spair(tiny_encoder(), tmp_path / "same", resolution=96, device="cpu")
    assert r.value == 1.0 and r.extra["num_keypoints"] == 20
    assert r.settings["long_side"] == 96
    make_spair(tmp_path / "other", identical=False)
    r = ev.spair(tiny_encoder(), tmp_path / "other", resolution=96, device="cpu", pairs_per_category=1)
    assert r.value < 0.5 and r.extra["num_pairs"] == 2


def _tiny_text_tower(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path / "eupe-test-tiny-clip.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(path))
    torch.manual_seed(0)
    weights = tmp_path / "tiny_clip.pt"
    torch.save(open_clip.create_model("eupe-test-tiny-clip").state_dict(), weights)
    return "eupe-test-tiny-clip", str(weights)


def test_zeroshot_through_a_fitted_adapter_head_and_teacher_norm(tmp_path):
    from eupe.eval.zeroshot import open_clip_text_tower, text_classifier
    from eupe.models.heads import TeacherHeads
    from eupe.models.teacher_norm import TeacherNorm

    name, weights = _tiny_text_tower(tmp_path)
    make_class_folders(tmp_path / "data", classes=6, per_class=3)
    names = ["red", "green", "yellow", "blue", "orange", "purple"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    text, tok = open_clip_text_tower(name, weights)
    classifier = text_classifier(text, tok, names, ["a photo of a {}."])
    # the student's "distilled" head: fit it so that, after TeacherNorm is undone, it lands on
    # the text embedding of the right class (what distillation from a CLIP teacher achieves)
    model = load_model(ColorEncoder(), device="cpu")
    train = ev.datasets.ClassFolder(tmp_path / "data" / "train")
    from eupe.eval.knn import classification_transform, extract_cls

    feats, labels = extract_cls(model, train, classification_transform(model, 32, 32), 64, 0, "fit")
    heads = TeacherHeads(16, {"clip_t": (16, 16)}, hidden_dim=32)
    norm = TeacherNorm({"clip_t": (16, 16)})
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(16, generator=g) * 10, 10 ** (2 * torch.rand(16, generator=g) - 1)
    norm.stats("clip_t", "cls")[0].copy_(mean)
    norm.stats("clip_t", "cls")[1].copy_(std)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for _ in range(100):
        emb = heads.cls["clip_t"](feats) * std + mean
        loss = F.cross_entropy(100 * F.normalize(emb, dim=-1) @ classifier.T, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    heads.save(tmp_path), norm.save(tmp_path)
    student = EvalModel(**{**model.__dict__, "heads_dir": tmp_path})
    common = dict(text_model=name, text_weights=weights, classnames=str(tmp_path / "names.txt"), device="cpu")
    common.update(resolution=32, resize=32, num_workers=0, templates="simple")  # as fitted above
    r = ev.zeroshot(student, tmp_path / "data", **common)
    assert r.status == "ok" and r.value == pytest.approx(1.0), r
    # a Stage-2/3 student only has a "proxy" head; chaining it with the proxy's own text-aligned
    # head ("proxy>clip_t", the proxy's folder in chain_dirs) reaches the text space too
    student_dir = tmp_path / "student"
    student_dir.mkdir()
    to_proxy = TeacherHeads(16, {"proxy": (16, 16)}, hidden_dim=64)
    opt = torch.optim.Adam(to_proxy.parameters(), lr=1e-2)
    for _ in range(100):  # the proxy's cls here is the ColorEncoder's: learn the identity
        loss = F.mse_loss(to_proxy.cls["proxy"](feats), feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
    to_proxy.save(student_dir)
    chained = EvalModel(**{**model.__dict__, "heads_dir": student_dir})
    r = ev.zeroshot(chained, tmp_path / "data", teacher="proxy>clip_t", chain_dirs=[str(tmp_path)], **common)
    assert r.value >= 0.8, r
    with pytest.raises(ConfigError, match="chain_dirs"):
        ev.zeroshot(chained, tmp_path / "data", teacher="proxy>clip_t", **common)
    # without undoing TeacherNorm the projected embeddings point elsewhere
    (tmp_path / "teacher_norm.safetensors").unlink()
    assert ev.zeroshot(student, tmp_path / "data", **common).value < 0.5
    # a head name that does not exist, or no heads at all: "not supported", no crash
    r = ev.zeroshot(student, tmp_path / "data", teacher="dinov3", **common)
    assert r.value is None and r.status.startswith("not supported: no adapter head for teacher 'dinov3'")
    r = ev.zeroshot(ColorEncoder(), tmp_path / "data", output_dir=tmp_path / "ns", **common)
    assert r.value is None and "heads.safetensors" in r.status
    assert json.loads((tmp_path / "ns" / "results.json").read_text())["value"] is None


def test_pca_grid_per_image_and_joint(tmp_path):
    make_spair(tmp_path, categories=("cat",), pairs=2)
    images = tmp_path / "SPair-71k" / "JPEGImages" / "cat"
    r = ev.pca(
        [ColorEncoder(), tiny_encoder()], images, output_dir=tmp_path / "pca", resolution=64, device="cpu"
    )
    assert (tmp_path / "pca" / "pca.png").stat().st_size > 1000
    assert set(r.extra["explained_variance"]) == {"ColorEncoder", "eupe_vitt16"}
    assert 0 < r.value <= 1
    joint = ev.pca([ColorEncoder()], images, joint=True, max_images=2, resolution=64, device="cpu")
    assert 0 < joint.value <= 1
