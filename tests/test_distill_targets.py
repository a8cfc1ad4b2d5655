"""distill/targets.py: the three sources of teacher targets behind one interface."""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from eupe.distill.config import load_config
from eupe.distill.norm import measure_norm
from eupe.distill.targets import LiveTeachers, PrecomputedTargets, ViewBatch
from eupe.distill.trainer import Distiller
from eupe.models import TeacherNorm

REPO = Path(__file__).resolve().parents[1]
ARGS = [
    "train.progress=false",
    "train.max_steps=4",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=0",
    "norm.batches=2",
]


def _views(n: int = 12) -> torch.Tensor:
    return (torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)


def _precomputed(cfg) -> tuple[PrecomputedTargets, LiveTeachers]:
    live = LiveTeachers(cfg, torch.device("cpu"))
    return PrecomputedTargets.compute(live.teachers, _views(), batch=5, progress=False), live


def test_precomputed_targets_are_the_live_teachers_normalized(tmp_path):
    cfg = load_config(REPO / "configs/tiny/stage1.yaml", [f"output_dir={tmp_path}", *ARGS])
    pre, live = _precomputed(cfg)
    assert pre.dims == live.dims and pre.sides == {n: 64 for n in live.sides}  # the views' side
    # TeacherNorm: the one measurement (measure_norm) over the same views, in the same batches
    norm = measure_norm(
        TeacherNorm(live.dims), live.teachers, (_views()[i : i + 5].float() / 255 for i in range(0, 12, 5))
    )
    assert all(
        torch.allclose(a, b) for a, b in zip(norm.state_dict().values(), pre.norm.state_dict().values())
    )
    batch = ViewBatch(_views()[[3, 7]].float() / 255, [{"source": 0, "index": 3}, {"source": 0, "index": 7}])
    got = pre.targets(batch, {})
    for name, teacher in live.teachers.items():
        want = pre.norm.normalize(name, teacher(batch.views))
        assert torch.allclose(got[name].cls, want.cls, atol=1e-5)
        assert torch.allclose(got[name].patches, want.patches, atol=1e-2)  # stored in float16
        assert tuple(got[name].grid) == tuple(want.grid)


def test_distiller_trains_from_precomputed_targets_and_resumes_exactly(tmp_path):
    """The views reach the run as a `views` data source; their targets come from memory by index."""
    views = tmp_path / "views.safetensors"
    save_file({"views": _views()}, str(views))
    data = [
        f"data.sources=[{{name: fixed, type: views, path: {views}}}]",
        "data.augment={crop_scale: [1.0, 1.0], crop_ratio: [1.0, 1.0], flip_p: 0.0, jitter_p: 0.0, "
        "blur_p: 0.0, solarize_p: 0.0}",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    runs = {}
    for out in (full, cut):
        cfg = load_config(REPO / "configs/tiny/stage1.yaml", [f"output_dir={out}", *ARGS, *data])
        runs[out] = cfg
        Distiller(cfg, source=_precomputed(cfg)[0]).train()
    assert len((full / "metrics.jsonl").read_text().splitlines()) == 4
    (cut / "checkpoints/step_4/COMPLETE").unlink()
    Distiller(runs[cut], resume=True, source=_precomputed(runs[cut])[0]).train()
    for f in ("model.safetensors", "heads.safetensors", "teacher_norm.safetensors"):
        a, b = load_file(str(full / "final" / f)), load_file(str(cut / "final" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f

    def losses(out: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert losses(cut) == losses(full)


def test_the_views_source_gives_the_views_back(tmp_path):
    from eupe.data import open_sources
    from eupe.data.config import DataConfig, SourceSpec

    path = tmp_path / "v.safetensors"
    save_file({"views": _views(5)}, str(path))
    (source,) = open_sources(DataConfig(sources=[SourceSpec(name="v", type="views", path=str(path))]))
    assert len(source) == 5
    assert torch.equal(torch.from_numpy(np.asarray(source.load(3))).permute(2, 0, 1), _views(5)[3])
