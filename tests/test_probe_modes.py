"""The probes' `backbone_mode` and seg's `select` (issue 28): Meta's probe loops keep the frozen
backbone in train mode until their first validation (seg) or for the whole run (depth), and seg
reports the best of its validations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import eupe.eval as ev
from eupe.errors import ConfigError
from eupe.eval.depth import DepthSettings
from eupe.eval.features import ProbeSchedule, WarmupOneCycle, backbone_train_mode, patch_features, train_probe
from eupe.eval.models import load_model
from eupe.eval.report import format_result
from eupe.eval.seg import release_train_steps

from .test_eval_data import ColorEncoder, make_ade20k, make_nyu, tiny_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_release_schedule_follows_the_first_validation():
    assert release_train_steps(40000, 5000) == 5000  # the release's config: train mode until 5000
    assert release_train_steps(2000, 250) == 250
    # not a multiple: the release's misplaced "last validation" runs after step 1 already
    assert release_train_steps(100, 12) == 1
    assert release_train_steps(10, 20) == 1
    # depth: eval_interval 100000 > 38400, so the whole run
    schedule = WarmupOneCycle(3e-4, 38400, 12800)
    for mode, steps in (("release", 38400), ("eval", 0)):
        s = DepthSettings(backbone_mode=mode)
        assert ProbeSchedule.from_settings(s, schedule, 38400).backbone_train_steps == steps


@pytest.mark.parametrize("cache_views", [0, 1])
def test_backbone_in_train_mode_exactly_on_the_release_steps(cache_views):
    m = load_model(tiny_encoder(), device="cpu")
    modes: list[bool] = []
    encode = m.encode_fn
    m.encode_fn = lambda x: (modes.append(m.module.training), encode(x))[1]
    seen: list[tuple[int, bool]] = []

    def view(i: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(rng.random((3, 32, 32), dtype=np.float32)), torch.zeros(32, 32)

    sched = ProbeSchedule(
        6, 2, WarmupOneCycle(1e-3, 6, 1), 0.0, backbone_train_steps=3, cache_views=cache_views
    )
    head = nn.Conv2d(m.module.embed_dim, 1, 1)
    loss = lambda out, target: out.mean()  # noqa: E731
    timing = train_probe(m, head, view, 4, loss, sched, "t", lambda n: seen.append((n, m.module.training)))
    assert timing["backbone_train_steps"] == 3
    if cache_views:  # two cache batches in eval mode, three live steps in train mode, then the cache
        assert modes == [False, False, True, True, True]
    else:
        assert modes[-6:] == [True, True, True, False, False, False]
    assert seen == [(1, True), (2, True), (3, False), (4, False), (5, False), (6, False)]
    assert not m.module.training and m.module.backbone.rope.rescale_coords is None  # restored


def test_release_features_jitter_and_eval_features_are_identical():
    m = load_model(tiny_encoder(depth=3), device="cpu")
    x = torch.rand(2, 3, 32, 32)
    before = patch_features(m, x)
    with backbone_train_mode(m):
        a, b = patch_features(m, x), patch_features(m, x)
        draws = m.module.backbone.rope.get_embed(shape=[2, 2])  # one RoPE draw per block, as Meta's
        assert draws.shape[0] == 3 and not torch.equal(draws[0], draws[1])
    assert not torch.equal(a, b)  # the RoPE rescale is on
    assert torch.equal(patch_features(m, x), patch_features(m, x)) and torch.equal(
        patch_features(m, x), before
    )


def test_seg_best_of_validations_and_depth_release_say_what_they_did(tmp_path):
    make_ade20k(tmp_path / "ade", n_train=4, n_val=2)
    settings = dict(resolution=64, scale_range=[1.0, 1.0], photometric=False, num_classes=4, batch_size=4)
    r = ev.seg(
        ColorEncoder(),
        tmp_path / "ade",
        iterations=12,
        eval_interval=5,
        select="best",
        backbone_mode="release",
        lr=0.05,
        warmup_iters=2,
        num_workers=0,
        device="cpu",
        **settings,
    )
    steps = [v["step"] for v in r.extra["validations"]]
    assert steps == [5, 10, 12]  # every eval_interval, and at the end
    assert r.value == max(v["mIoU"] for v in r.extra["validations"])
    assert r.extra["selected_step"] in steps and r.extra["backbone_train_steps"] == 1  # 12 % 5 != 0
    assert "backbone_mode=release, select=best (step" in format_result(r)
    with pytest.raises(ConfigError, match="select"):
        ev.seg(ColorEncoder(), tmp_path / "ade", select="first", device="cpu")
    make_nyu(tmp_path / "nyu", n_train=2, n_test=1)
    r = ev.depth(
        ColorEncoder(), tmp_path / "nyu", crop=[32, 48], iterations=3, batch_size=2, backbone_mode="release",
        num_workers=0, device="cpu",
    )  # fmt: skip
    assert r.extra["backbone_mode"] == "release" and r.extra["backbone_train_steps"] == 3
    with pytest.raises(ConfigError, match="backbone_mode"):
        ev.depth(ColorEncoder(), tmp_path / "nyu", backbone_mode="train", device="cpu")
