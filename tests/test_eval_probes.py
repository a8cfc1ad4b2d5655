"""The seg and depth probes' pieces against Meta's released probe code (eupe/eval/{segmentation,depth}).

Reference numbers were produced by running the release's `WarmupOneCycleLR` with the same
arguments (loop as in its train.py files); the other checks are hand-computed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from eupe.eval.depth import color_jitter, predict_depth, rotate_pair
from eupe.eval.features import WarmupOneCycle
from eupe.eval.models import load_model
from eupe.eval.seg import LinearSegHead, photometric_distortion, seg_loss, sliding_logits
from eupe.eval.transforms import pad_bottom_right, random_crop, short_side_size

from .test_eval_data import ColorEncoder


def test_seg_schedule_matches_the_release():
    # config-ade20k-linear-training: warmup_ratio 1e-6, final_div_factor inf, scheduler not
    # stepped after the first iteration; here 400 iterations with 15 warmup steps
    s = WarmupOneCycle(1e-3, 400, 15, warmup_ratio=1e-6, final_div_factor=float("inf"), step_offset=1)
    assert [s(i)[0] for i in (0, 1, 2)] == pytest.approx([1e-9, 1e-9, 6.650093100000005e-05], rel=1e-9)
    assert s(398)[0] == pytest.approx(6.168375916970615e-08, rel=1e-9)
    assert s(399)[0] == pytest.approx(1.5421177605168258e-08, rel=1e-9)
    assert all(s(i)[1] is None for i in range(400))  # beta1 stays 0.9


def test_depth_schedule_and_momentum_match_the_release():
    # config-nyu: final_div_factor 1000, momentum 0.85 -> 0.95, 400 iterations, 133 warmup steps
    s = WarmupOneCycle(3e-4, 400, 133, momentum=(0.85, 0.95))
    assert s(0) == pytest.approx((3e-7, 0.0))
    assert s(1)[0] == pytest.approx(2.5556043131332214e-06, rel=1e-9)
    assert s(132) == pytest.approx((0.00022495428595381466, 0.0), rel=1e-9)
    assert s(133) == pytest.approx((0.00022432182751285052, 0.85), rel=1e-9)
    assert s(399) == pytest.approx((1.2e-08, 0.9499965389153533), rel=1e-9)


def test_seg_loss_averages_over_every_pixel_ignored_ones_as_zero():
    logits = torch.zeros(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [255, 255]]])
    assert float(seg_loss(logits, labels)) == pytest.approx(np.log(3) / 2)


def test_seg_head_dropout_only_in_training_and_small_init():
    head = LinearSegHead(8, 3, dropout=0.5)
    assert float(head.conv.weight.detach().std()) < 0.02 and not head.conv.bias.detach().any()
    x = torch.randn(4, 8, 2, 2)
    head.eval()
    assert torch.equal(head(x), head(x))


def test_random_crop_avoids_one_class_crops():
    label = torch.zeros(32, 32, dtype=torch.long)
    label[:, 28:] = 1  # only crops touching the right edge hold two classes
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(20):
        _, crop = random_crop(torch.zeros(3, 32, 32), label, (8, 8), rng, cat_max_ratio=0.75)
        values, counts = torch.unique(crop, return_counts=True)
        hits += len(values) > 1 and counts.max() / counts.sum() < 0.75
    assert hits >= 10  # 11 tries per crop; a uniform crop qualifies with probability ~1/8
    img, lab = random_crop(torch.zeros(3, 5, 40), torch.zeros(5, 40), (8, 8), rng)
    assert img.shape == (3, 5, 8) and lab.shape == (5, 8)  # smaller sides are kept whole


def test_pad_bottom_right_pads_the_mean_colour_and_ignore():
    img, lab = pad_bottom_right(torch.ones(3, 2, 3), torch.zeros(2, 3), (4, 4), (0.1, 0.2, 0.3), 255)
    assert img.shape == (3, 4, 4) and torch.equal(img[:, :2, :3], torch.ones(3, 2, 3))
    assert img[:, 3, 3].tolist() == pytest.approx([0.1, 0.2, 0.3]) and lab[3, 3] == 255 and lab[1, 2] == 0


def test_short_side_size_rounds_like_the_release():
    assert short_side_size(300, 400, 512) == (512, 683)
    assert short_side_size(400, 300, 512) == (683, 512)


def test_photometric_distortion_is_seeded_and_in_range():
    img = torch.rand(3, 16, 16)
    a = photometric_distortion(img, np.random.default_rng(3))
    b = photometric_distortion(img, np.random.default_rng(3))
    assert torch.equal(a, b) and a.shape == img.shape and 0 <= a.min() and a.max() <= 1
    changed = [
        not torch.allclose(photometric_distortion(img, np.random.default_rng(i)), img) for i in range(8)
    ]
    assert sum(changed) >= 6


class _CountingHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, feats):
        self.calls.append(tuple(feats.shape[-2:]))
        return torch.ones(feats.shape[0], 2, *feats.shape[-2:])


def test_sliding_windows_follow_the_release_grid():
    model = load_model(ColorEncoder(), device="cpu")
    head = _CountingHead()
    out = sliding_logits(model, head, torch.rand(3, 64, 112), window=64, stride=42, num_classes=2)
    # columns: (112 - 64 + 41) // 42 + 1 = 3 windows (x = 0, 42, 48), one row
    assert len(head.calls) == 3 and set(head.calls) == {(4, 4)}
    assert torch.allclose(out, torch.ones(2, 64, 112))


def test_depth_augmentations():
    img, d = torch.rand(3, 40, 40), torch.full((40, 40), 2.0)
    rimg, rd = rotate_pair(img, d, 2.5)
    assert rd[0, 0] == 0 and rd[20, 20] == 2.0 and rimg.shape == img.shape  # corners lose depth
    jit = color_jitter(img, np.random.default_rng(0), (0.75, 1.25))
    assert jit.shape == img.shape and 0 <= jit.min() and jit.max() <= 1 and not torch.allclose(jit, img)


def test_flip_tta_averages_the_mirrored_prediction():
    model = load_model(ColorEncoder(), device="cpu")

    class Row(nn.Module):
        def forward(self, feats):  # a depth map that increases to the right
            return torch.arange(feats.shape[-1], dtype=torch.float).expand(
                feats.shape[0], 1, *feats.shape[-2:]
            )

    pred = predict_depth(model, Row(), torch.rand(3, 32, 64), flip_tta=True)
    assert torch.allclose(pred, torch.full_like(pred, 1.5))  # (x + (3 - x)) / 2 over 4 columns
    assert predict_depth(model, Row(), torch.rand(3, 32, 64), flip_tta=False)[0, 0, 3] == 3
