"""TeacherNorm's relative std floor: a channel dead in the measurement batches cannot explode later."""

from __future__ import annotations

from pathlib import Path

import torch

from eupe.models.encoder import EncoderOutput
from eupe.models.teacher_norm import TeacherNorm


def _measured(dead_channel: bool) -> tuple[TeacherNorm, EncoderOutput]:
    torch.manual_seed(0)
    norm = TeacherNorm({"t": (4, 8)})
    out = EncoderOutput(torch.randn(16, 4) * 2, torch.relu(torch.randn(16, 9, 8)) * 3, None, (3, 3))
    if dead_channel:
        out.patches[..., 5] = 0.0  # a ReLU channel that never fires on the measurement images
        out.cls[:, 1] = 0.25  # and a constant cls coordinate
    norm.observe("t", out)
    norm.freeze()
    return norm, out


def test_dead_channel_std_is_floored_relative_to_the_median(tmp_path: Path):
    norm, out = _measured(dead_channel=True)
    patch_std, cls_std = norm.t__patch_std, norm.t__cls_std
    live = torch.cat([patch_std[:5], patch_std[6:]])
    assert torch.allclose(patch_std[5], 1e-2 * patch_std.median(), rtol=1e-5)
    assert torch.allclose(live, out.patches.reshape(-1, 8)[:, [0, 1, 2, 3, 4, 6, 7]].std(0), atol=1e-5)
    assert cls_std[1] >= 1e-2 * cls_std.median() * (1 - 1e-6) and cls_std[1] > 1e-3
    # the channel fires later: its normalized target stays O(100), not O(1e6) as with an eps floor
    later = EncoderOutput(out.cls, torch.full_like(out.patches, 3.0), None, (3, 3))
    assert norm.normalize("t", later).patches.abs().max() < 1e3
    # the saved format is unchanged: load() gives the same statistics
    norm.save(tmp_path)
    loaded = TeacherNorm.load(tmp_path)
    assert torch.equal(loaded.t__patch_std, patch_std) and bool(loaded.frozen)


def test_floor_leaves_healthy_statistics_alone():
    norm, out = _measured(dead_channel=False)
    assert torch.allclose(norm.t__patch_std, out.patches.reshape(-1, 8).std(0), atol=1e-5)
