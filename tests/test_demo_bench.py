"""The demo benchmarks on hand-made features whose right answer is known (no models)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from eupe.demo import bench as B
from eupe.demo import data as D
from eupe.demo.assets import make_splits
from eupe.models.encoder import EncoderOutput, feature_map_to_output


def _pooled_pixels(stride: int):
    """A featurizer whose patch tokens are the mean colour of each stride x stride cell."""

    def run(images01: torch.Tensor) -> EncoderOutput:
        return feature_map_to_output(F.avg_pool2d(images01, stride))

    return run


def test_knn_is_perfect_on_clustered_features_and_chance_level_on_noise():
    labels = torch.arange(4).repeat_interleave(5)
    centers = torch.eye(4) * 10
    feats = centers[labels] + 0.1 * torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    assert B.leave_one_out_knn(feats, labels, k=1) == 1.0
    assert B.leave_one_out_knn(feats, labels, k=3) == 1.0
    noise = torch.randn(400, 32, generator=torch.Generator().manual_seed(1))
    assert B.leave_one_out_knn(noise, torch.arange(4).repeat(100), k=1) < 0.4


def test_pck_is_one_for_unique_features_under_a_pure_translation():
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(16, 8, 8, generator=g)
    shifted = torch.roll(fmap, shifts=(0, 2), dims=(1, 2))  # content moves 2 cells = 32 px right
    h = np.array([[1.0, 0, 32], [0, 1, 0], [0, 0, 1]])
    correct, total = B.match_pck(fmap, shifted, h, (128, 128), (128, 128), alpha=0.05)
    assert total == 6 * 8 and correct == total
    wrong = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    correct, total = B.match_pck(fmap, shifted, wrong, (128, 128), (128, 128), alpha=0.05)
    assert correct == 0


def test_pck_counts_only_points_that_move_beyond_the_threshold():
    """A point the warp leaves within reach of its own position is not scored: features that encode
    position alone would match it (the content-free reference scores ~0 on the demo's warps)."""
    fmap = torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(0))
    small = np.array([[1.0, 0, 4], [0, 1, 0], [0, 0, 1]])  # 4 px < 0.05 * 128
    assert B.match_pck(fmap, fmap, small, (128, 128), (128, 128), alpha=0.05) == (0, 0)
    position = B.position_only(16)(torch.zeros(2, 3, 128, 128))
    maps = position.patch_map()
    shift = np.array([[1.0, 0, 32], [0, 1, 0], [0, 0, 1]])
    correct, total = B.match_pck(maps[0], maps[1], shift, (128, 128), (128, 128), alpha=0.05)
    assert total == 6 * 8 and correct == 0


def test_the_content_free_reference_scores_near_nothing_on_the_demo_warps():
    splits = make_splits(0)
    src, dst, hs = D.homography_set(splits, 4, seed=0, size=128)
    out = B.pck(B.position_only(16), src, dst, hs, alpha=0.1)
    assert out["points"] > 20 and out["pck"] < 0.1


def test_text_probe_finds_text_that_colour_alone_reveals(one_torch_thread):
    rng = np.random.default_rng(0)
    images = np.zeros((12, 64, 64, 3), dtype=np.uint8)
    images[..., 2] = 200  # blue background
    masks = np.zeros((12, 64, 64), dtype=bool)
    for i in range(12):
        y, x = rng.integers(0, 40, size=2)
        masks[i, y : y + 16, x : x + 24] = True
    images[masks] = (255, 0, 0)
    iou = B.text_iou(
        _pooled_pixels(4), (images[:8], masks[:8]), (images[8:], masks[8:]), eval_side=16, steps=100
    )
    assert iou > 0.9
    blind = B.text_iou(
        lambda x: feature_map_to_output(torch.zeros(len(x), 4, 4, 4)),
        (images[:8], masks[:8]),
        (images[8:], masks[8:]),
        eval_side=16,
        steps=100,
    )
    assert blind < 0.5


def test_pck_runs_end_to_end_on_generated_warps():
    splits = make_splits(0)
    src, dst, hs = D.homography_set(splits, 2, seed=0, size=64, strength=0.15)
    out = B.pck(_pooled_pixels(8), src, dst, hs, alpha=0.1, graf=D.graf_pair(80, 64))
    assert 0.0 <= out["pck"] <= 1.0 and out["points"] > 0 and 0.0 <= out["pck_graf"] <= 1.0
