"""Metric implementations against hand-computed values, and the shared settings/result plumbing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eupe.errors import ConfigError
from eupe.eval.common import EvalResult, parse_overrides, read_result, resolve_settings
from eupe.eval.depth import depth_metrics, eigen_crop_mask, sig_loss
from eupe.eval.knn import KNNSettings, knn_accuracy, knn_predict, running_topk, vote_paper, vote_release
from eupe.eval.pca import pca_rgb
from eupe.eval.seg import intersect_union, mean_iou
from eupe.eval.spair import long_side_for, match_keypoints, pck


def test_knn_votes_by_hand():
    # neighbours sorted best first; labels per neighbour
    sims = torch.tensor([[1.0, 0.9, 0.9, 0.1], [0.9, 0.5, 0.4, 0.3]])
    labels = torch.tensor([[0, 1, 1, 2], [2, 1, 1, 0]])
    # release, T = 0.07: exp(1/T) > 2 exp(0.9/T) (ratio e^(0.1/0.07) = 4.2), so one close
    # neighbour outvotes two farther ones; with T = 1 the two win
    assert vote_release(sims, labels, 3, 3, 0.07).tolist() == [0, 2]
    assert vote_release(sims, labels, 3, 3, 1.0).tolist() == [1, 1]
    assert vote_release(sims, labels, 1, 3).tolist() == [0, 2]
    # paper: distances sorted ascending; plain majority, a tie goes to the smallest summed distance
    dists = torch.tensor([[0.1, 0.5, 0.6, 0.7], [0.2, 0.3, 0.35, 0.4], [0.1, 0.2, 0.3, 0.5]])
    labels = torch.tensor([[0, 1, 1, 2], [2, 1, 0, 2], [0, 1, 1, 0]])
    assert vote_paper(dists, labels, 3, 3).tolist() == [1, 2, 1]  # row 1: a 1-1-1 tie, class 2 is nearest
    assert vote_paper(dists, labels, 2, 3).tolist() == [0, 2, 0]  # 1-1 ties
    # row 2, k=4: 2 votes each; class 1 (0.2 + 0.3) beats class 0 (0.1 + 0.5) despite the nearest
    assert vote_paper(dists, labels, 4, 3).tolist() == [1, 2, 1]


def test_running_topk_matches_full_topk():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(7, 5, generator=g), torch.randn(50, 5, generator=g)
    s, i = running_topk(q, bank, k=6, chunk_size=8)  # 7 chunks, last one partial
    full_s, full_i = (q @ bank.T).topk(6, dim=1)
    assert torch.allclose(s, full_s) and torch.equal(i, full_i)
    s, i = running_topk(q, bank[:3], k=10, chunk_size=2)  # bank smaller than k
    assert s.shape == (7, 3)


def test_knn_accuracy_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, 0.05]])
    train_y = torch.tensor([0, 0, 1, 1, 1])
    val = torch.tensor([[1.0, 0.04], [0.05, 1.0], [3.0, 0.3]])  # val2 points exactly along train1
    val_y = torch.tensor([0, 1, 1])
    acc = knn_accuracy(train, train_y, val, val_y, ks=[1, 3], num_classes=2, protocol="release", chunk_size=2)
    # release (cosine): k=1: val0 -> train4 (label 1) wrong; val1 -> train2 right; val2 -> train1 wrong
    assert acc[1] == pytest.approx(1 / 3)
    # k=3: val0 -> {4, 0, 1}: two near-equal 0 weights beat one: right; val1 -> {2, 3, 1}: right;
    # val2 -> {1, 4, 0}: wrong
    assert acc[3] == pytest.approx(2 / 3)
    # paper (raw L2): k=1: val0 -> train4 wrong; val1 -> train2 right; val2 ([3, 0.3]) -> train4 right
    acc = knn_accuracy(train, train_y, val, val_y, ks=[1, 3], num_classes=2, protocol="paper", chunk_size=2)
    assert acc[1] == pytest.approx(2 / 3)
    assert acc[3] == pytest.approx(2 / 3)  # val2 -> {4, 0, 1}: two 0s, wrong; val0 -> {4, 0, 1} right
    with pytest.raises(ConfigError, match="protocol"):
        knn_accuracy(train, train_y, val, val_y, ks=[1], num_classes=2, protocol="cosine")


def _knn_reference(train, train_y, val, ks, num_classes, protocol, temperature=0.07):
    """One val image at a time, in float64, with the full distance row: the protocols as written."""
    train, val = train.double().numpy(), val.double().numpy()
    train_y = train_y.numpy()
    if protocol == "release":
        train = train / np.linalg.norm(train, axis=1, keepdims=True)
        val = val / np.linalg.norm(val, axis=1, keepdims=True)
    preds = {k: [] for k in ks}
    for q in val:
        if protocol == "release":
            sims = train @ q
            order = np.argsort(-sims, kind="stable")
        else:
            dists = np.sqrt(((train - q) ** 2).sum(1))
            order = np.argsort(dists, kind="stable")
        for k in ks:
            nb = order[: min(k, len(train))]
            if protocol == "release":
                w = np.exp(sims[nb] / temperature)
                w = w / w.sum()  # the release's softmax over the neighbours
                scores = np.zeros(num_classes)
                np.add.at(scores, train_y[nb], w)
                preds[k].append(int(np.argmax(scores)))
            else:
                votes = np.bincount(train_y[nb], minlength=num_classes)
                summed = np.zeros(num_classes)
                np.add.at(summed, train_y[nb], dists[nb])
                tied = np.flatnonzero(votes == votes.max())
                preds[k].append(int(tied[np.argmin(summed[tied])]))
    return {k: np.array(v) for k, v in preds.items()}


@pytest.mark.parametrize("protocol,temperature", [("release", 0.07), ("release", 1.0), ("paper", 0.07)])
def test_knn_matches_a_reference_implementation(protocol, temperature):
    g = torch.Generator().manual_seed(0)
    classes, n_train, n_val, dim = 7, 230, 61, 12
    centres = 1.5 * torch.randn(classes, dim, generator=g)
    train_y = torch.randint(classes, (n_train,), generator=g)
    val_y = torch.randint(classes, (n_val,), generator=g)
    # uneven norms, so cosine and L2 rank differently
    scale = lambda n: torch.exp(torch.randn(n, 1, generator=g))  # noqa: E731
    train = (centres[train_y] + 2 * torch.randn(n_train, dim, generator=g)) * scale(n_train)
    val = (centres[val_y] + 2 * torch.randn(n_val, dim, generator=g)) * scale(n_val)
    ks = [1, 10, 20, 100, 200, 500]  # 500 > 230 train features: all of them
    ref = _knn_reference(train, train_y, val, ks, classes, protocol, temperature)
    # small chunks: several bank blocks (the last one partial) and several val blocks
    kw = dict(protocol=protocol, temperature=temperature, chunk_size=37, query_chunk=16)
    preds = knn_predict(train, train_y, val, ks, classes, **kw)
    acc = knn_accuracy(train, train_y, val, val_y, ks, classes, **kw)
    for k in ks:
        assert preds[k].tolist() == ref[k].tolist(), k
        assert acc[k] == pytest.approx(float((ref[k] == val_y.numpy()).mean()), abs=1e-6)
    assert 0.2 < acc[10] < 0.95  # neither chance (1/7) nor trivial


def test_miou_with_absent_classes_by_hand():
    label = np.array([[0, 0, 1, 255], [1, 1, 2, 2]])
    pred = np.array([[0, 1, 1, 3], [1, 1, 2, 0]])
    inter, union = intersect_union(pred, label, num_classes=4)
    # class 0: I=1, U=|{p0}|2 + |{l0}|2 - 1 = 3; class 1: I=3, U=4+3-3=4; class 2: I=1, U=1+2-1=2
    # class 3: predicted only on the ignored pixel -> union 0, absent
    assert inter.tolist() == [1, 3, 1, 0] and union.tolist() == [3, 4, 2, 0]
    miou, iou = mean_iou(inter, union)
    assert miou == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert np.isnan(iou[3])


def test_pck_by_hand():
    gt = np.array([[10.0, 10.0], [50.0, 50.0], [0.0, 0.0]])
    pred = np.array([[13.0, 14.0], [50.0, 56.1], [0.0, 6.0]])
    bbox = np.array([0, 0, 60, 40])  # threshold 0.1 * 60 = 6
    assert pck(pred, gt, bbox).tolist() == [True, False, True]
    assert long_side_for(14) == 448 and long_side_for(16) == 512 and long_side_for(32) == 512


def test_match_keypoints_finds_identical_features():
    feats = torch.nn.functional.normalize(torch.randn(8, 6, 9), dim=0)
    xy = np.array([[0.2, 0.4], [8.0, 5.0], [3.6, 2.5]])
    assert match_keypoints(feats, feats, xy).tolist() == [[0, 0], [8, 5], [4, 2]]  # rounded (x, y)


def test_depth_metrics_by_hand():
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])
    pred = np.array([[1.0, 3.0], [2.0, 9.0]])
    mask = gt > 0
    m = depth_metrics(pred, gt, mask)
    assert m["rmse"] == pytest.approx(np.sqrt((0 + 1 + 4) / 3))
    assert m["abs_rel"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert m["delta1"] == pytest.approx(1 / 3)  # ratios 1, 1.5, 2


def test_eigen_crop_scales_with_the_image():
    full = eigen_crop_mask(480, 640)
    assert full.sum() == (471 - 45) * (601 - 41) and full[45, 41] and not full[44, 41] and not full[45, 601]
    half = eigen_crop_mask(240, 320)
    rows, cols = np.where(half)
    # int() of the scaled box, as the release's make_valid_mask: 22.5 -> 22, 235.5 -> 235
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (22, 235, 20, 300)


def test_sig_loss_is_the_release_formula():
    gt = torch.rand(2, 8, 8) * 5 + 1
    gt[0, 0, :3] = 0.0  # no depth: left out
    assert float(sig_loss(gt[:, None].clone(), gt)) == pytest.approx(0.0, abs=1e-5)
    # pred = 2 * gt: g = log(2 gt + 1e-3) - log(gt + 1e-3), unbiased variance
    valid = gt.numpy() > 0
    g = np.log(2 * gt.numpy()[valid] + 1e-3) - np.log(gt.numpy()[valid] + 1e-3)
    expected = np.sqrt(g.var(ddof=1) + 0.15 * g.mean() ** 2)
    assert float(sig_loss(2 * gt[:, None], gt)) == pytest.approx(expected, rel=1e-4)
    # the warm-up form (first 100 steps of the release) leaves the variance out
    warm = float(sig_loss(2 * gt[:, None], gt, with_variance=False))
    assert warm == pytest.approx(np.sqrt(0.15) * abs(g.mean()), rel=1e-4)


def test_pca_rgb_on_known_components():
    # tokens on three orthogonal axes with decreasing spread: 3 components explain everything
    g = torch.Generator().manual_seed(0)
    coeff = torch.randn(40, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0])
    tokens = torch.cat([coeff, torch.zeros(40, 5)], 1)
    (rgb,), explained = pca_rgb([tokens])
    assert explained == pytest.approx(1.0) and rgb.shape == (40, 3)
    assert rgb.min() >= 0 and rgb.max() <= 1
    # the first colour channel follows the largest-spread axis
    assert np.corrcoef(rgb[:, 0], coeff[:, 0].numpy())[0, 1] ** 2 > 0.8


def test_overrides_and_settings():
    assert parse_overrides(["iterations=10", "k=[10,20]", "lr=1e-3", "teacher=pe"]) == {
        "iterations": 10,
        "k": [10, 20],
        "lr": 0.001,
        "teacher": "pe",
    }
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["iterations"])
    assert resolve_settings(KNNSettings, {"k": [5], "batch_size": 3}).k == [5]
    with pytest.raises(ConfigError, match="unknown setting.*itrations.*valid"):
        resolve_settings(KNNSettings, {"itrations": 3})
    with pytest.raises(ConfigError, match="batch_size"):
        resolve_settings(KNNSettings, {"batch_size": "many"})
    with pytest.raises(ConfigError, match="positive"):
        resolve_settings(KNNSettings, {"k": [0]})


def test_results_json_round_trip(tmp_path):
    r = EvalResult("knn", "top1@k=10", 0.5, "m", "d", {"k": [10]}, extra={"x": np.float32(1.5)})
    path = r.write(tmp_path / "out")
    data = json.loads(path.read_text())
    assert set(data) >= {"task", "metric", "value", "model", "dataset", "settings", "extra", "status"}
    assert read_result(tmp_path / "out").value == 0.5 and data["extra"]["x"] == 1.5


def test_zero_shot_applies_the_clip_visual_projection_only_when_widths_differ():
    from types import SimpleNamespace

    from eupe.eval.zeroshot import to_text_space, zero_shot_logits

    proj = torch.randn(6, 4)
    clip = SimpleNamespace(visual=SimpleNamespace(proj=proj))
    emb = torch.randn(3, 6)
    out, used = to_text_space(emb, clip, 4)
    assert used and torch.allclose(out, emb @ proj)
    same, used = to_text_space(out, clip, 4)
    assert not used and same is out
    # softmax over scaled cosine similarities: the closest class wins
    classifier = torch.nn.functional.normalize(torch.eye(4)[:3], dim=-1)
    logits = zero_shot_logits(torch.tensor([[0.1, 2.0, 0.0, 0.0]]), classifier, 100.0)
    assert logits.argmax().item() == 1 and logits[0, 1] == pytest.approx(100 * 2.0 / np.hypot(0.1, 2.0))
