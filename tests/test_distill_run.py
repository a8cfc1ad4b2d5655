"""End-to-end runs of `eupe distill` on the tiny CPU configs: the three stages chained, exact
kill-and-resume, NaN stop."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import eupe
from eupe.cli import main
from eupe.distill.checkpoint import list_checkpoints
from eupe.models import TeacherHeads, TeacherNorm

REPO = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread when the CPU is shared; the killed subprocess uses
    the same count, so its float reductions match the uninterrupted run bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _distill(*args: str) -> None:
    assert main(["distill", *args]) == 0


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _loss_falls(out: Path) -> bool:
    losses = [row["loss"] for row in _metrics(out)]
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The tiny recipe chained exactly as documented: stage1 -> stage2 -> stage3."""
    root = tmp_path_factory.mktemp("tiny")
    s1, s2, s3 = root / "S1", root / "S2", root / "S3"
    _distill(str(REPO / "configs/tiny/stage1.yaml"), f"output_dir={s1}", *QUIET)
    _distill(
        str(REPO / "configs/tiny/stage2.yaml"),
        f"teachers.proxy.checkpoint={s1}/final",
        f"output_dir={s2}",
        *QUIET,
    )
    _distill(
        str(REPO / "configs/tiny/stage3.yaml"),
        f"teachers.proxy.checkpoint={s1}/final",
        f"student.init={s2}/final",
        f"output_dir={s3}",
        *QUIET,
    )
    return {"S1": s1, "S2": s2, "S3": s3}


@pytest.mark.parametrize("stage", ["S1", "S2", "S3"])
def test_tiny_stages_chain_and_loss_falls(runs, stage):
    out = runs[stage]
    assert _loss_falls(out), [row["loss"] for row in _metrics(out)]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    teachers = ["vit_a", "vit_b"] if stage == "S1" else ["proxy"]
    for t in teachers:
        for term in ("cls_cos", "patch_cos", "patch_sl1", "total"):
            assert f"loss/{t}/{term}" in rows[0]
    assert {"lr", "loss", "images_per_s"} <= set(rows[0])
    assert (out / "config.yaml").is_file()
    assert [s for s, _ in list_checkpoints(out)] == ([20, 30] if stage != "S3" else [10, 20])

    final = out / "final"
    student = eupe.create_model(final).eval()
    heads, norm = TeacherHeads.load(final), TeacherNorm.load(final)
    assert list(heads.teacher_dims) == teachers and norm.teachers == teachers and bool(norm.frozen)
    with torch.no_grad():
        cls, patches = heads(student(torch.rand(1, 3, 64, 64)), teachers[:1])[teachers[0]]
    assert cls.shape[0] == 1 and patches.shape[1] == 16
    # the ViT students train with the official RoPE coordinate rescale
    assert json.loads((final / "config.json").read_text())["overrides"]["rope_rescale_coords"] == 2.0


def test_stage3_draws_pyramid_scales_and_starts_from_stage2(runs):
    import yaml

    cfg = yaml.safe_load((runs["S3"] / "config.yaml").read_text())
    assert cfg["stage"] == "pyramid" and cfg["student"]["init"] == f"{runs['S2']}/final"
    rows = _metrics(runs["S3"])
    student = [r["resolution/student"] for r in rows]
    teacher = [r["resolution/proxy"] for r in rows]
    assert set(student) == set(teacher) == {32, 48, 64}  # every scale drawn by both
    assert student != teacher  # independently
    # Stage 3 continues the Stage-2 student and its heads: its first loss is far below Stage 2's first.
    s2, s3 = _metrics(runs["S2"]), _metrics(runs["S3"])
    assert s3[0]["loss"] < s2[0]["loss"] / 2


def test_init_heads_reused_only_where_they_fit(runs):
    from eupe.distill.stages import load_matching_heads

    init = runs["S2"] / "final"
    saved = TeacherHeads.load(init)
    same = TeacherHeads(saved.student_dim, saved.teacher_dims, saved.hidden_dim)
    assert load_matching_heads(same, str(init)) == ["proxy"]
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), saved.state_dict().values()))
    other = TeacherHeads(saved.student_dim, {"proxy": (7, 7), "new": (4, 4)}, saved.hidden_dim)
    assert load_matching_heads(other, str(init)) == []


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from eupe.distill import trainer

    step = trainer.Distiller.optimizer_step

    def killed_mid_step(self, s):  # after forward + backward of step KILL_AT, before its update
        if self.step + 1 == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, s)

    trainer.Distiller.optimizer_step = killed_mid_step
    from eupe.cli import main
    main(sys.argv[1:])
    """
)


def test_sigkill_mid_step_then_resume_equals_uninterrupted(runs, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    cmd = [
        sys.executable,
        str(script),
        "distill",
        str(REPO / "configs/tiny/stage1.yaml"),
        f"output_dir={out}",
    ]
    proc = subprocess.run(
        cmd + QUIET,
        env={**os.environ, "KILL_AT": "25", "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        capture_output=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [s for s, _ in list_checkpoints(out)] == [10, 20] and not (out / "final").exists()
    assert len(_metrics(out)) == 24
    # a kill while writing step_30 would have left it without its COMPLETE marker: resume ignores it
    stale = out / "checkpoints" / "step_30"
    stale.mkdir()
    (stale / "trainer.json").write_text("{")
    assert [s for s, _ in list_checkpoints(out)] == [10, 20]

    _distill("--resume", str(out))

    assert (stale / "COMPLETE").is_file() and json.loads((stale / "trainer.json").read_text())["step"] == 30
    ref = runs["S1"]  # the same config, uninterrupted
    for name in ("model.safetensors", "heads.safetensors", "teacher_norm.safetensors"):
        a, b = load_file(str(ref / "final" / name)), load_file(str(out / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    got, want = _metrics(out), _metrics(ref)
    assert [r["step"] for r in got] == list(range(1, 31))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert main(["distill", "--resume", str(out)]) == 0  # already complete: nothing to do


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    from eupe.distill import trainer

    loss_fn = trainer.Distiller.student_loss

    def poisoned(self, s, views, targets, resolution):
        loss, terms = loss_fn(self, s, views, targets, resolution)
        if self.step + 1 == 13:
            loss, terms = loss * float("nan"), {**terms, "loss/vit_a/patch_cos": torch.tensor(float("nan"))}
        return loss, terms

    monkeypatch.setattr(trainer.Distiller, "student_loss", poisoned)
    out = tmp_path / "nan"
    code = main(["distill", str(REPO / "configs/tiny/stage1.yaml"), f"output_dir={out}", *QUIET])
    err = capsys.readouterr().err
    assert code == 3  # TrainingDiverged
    assert "training diverged at step 13: grad_norm=nan" in err and "loss/vit_a/patch_cos=nan" in err
    assert "step_10" in err and len(err.strip().splitlines()) == 1
    assert [s for s, _ in list_checkpoints(out)] == [10] and not (out / "final").exists()
    assert json.loads((out / "checkpoints/step_10/trainer.json").read_text())["step"] == 10
    assert [r["step"] for r in _metrics(out)] == list(range(1, 13))
    # the run can continue from the intact checkpoint once the cause is fixed
    monkeypatch.setattr(trainer.Distiller, "student_loss", loss_fn)
    _distill("--resume", str(out))
    assert (out / "final" / "model.safetensors").is_file()


def test_fresh_run_refuses_an_existing_run_and_resume_refuses_overrides(runs, capsys):
    assert main(["distill", str(REPO / "configs/tiny/stage1.yaml"), f"output_dir={runs['S1']}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["distill", "--resume", str(runs["S1"]), "train.lr=1"]) == 2
    assert "takes no config or overrides" in capsys.readouterr().err


def test_teacher_resolution_not_multiple_of_patch_size(tmp_path, capsys):
    out = tmp_path / "bad"
    args = [
        str(REPO / "configs/tiny/stage1.yaml"),
        f"output_dir={out}",
        "teachers.vit_a.resolution=60",
        *QUIET,
    ]
    assert main(["distill", *args]) == 2
    err = capsys.readouterr().err
    assert "teachers.vit_a" in err and "resolution=60" in err and "nearest: 64" in err
    assert not out.exists()  # nothing is written before the config is known to be good


def test_corrupt_files_are_skipped_counted_and_reported(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 255 - 40 * i, 90)).save(images / f"{i}.png")
    (images / "truncated.png").write_bytes((images / "0.png").read_bytes()[:30])
    (images / "notes.jpg").write_text("not an image")
    out = tmp_path / "run"
    _distill(
        str(REPO / "configs/tiny/stage1.yaml"),
        f"output_dir={out}",
        f"data.sources=[{{name: imgs, type: folder, path: {images}}}]",
        "train.max_steps=4",
        "norm.batches=2",
        *QUIET,
    )
    assert _metrics(out)[-1]["data/skipped"] > 0
    assert "data: skipped" in capsys.readouterr().err


def test_convnext_student_from_the_proxy(runs, tmp_path):
    """ConvNeXt students: stride 32, so their 2x2 patch outputs are upsampled to the proxy's 4x4."""
    out = tmp_path / "convnext"
    _distill(
        str(REPO / "configs/tiny/stage2.yaml"),
        f"teachers.proxy.checkpoint={runs['S1']}/final",
        f"output_dir={out}",
        "student.name=eupe_convnext_tiny",
        "~student.overrides.depth",
        "student.overrides={depths: [1, 1, 1, 1], dims: [16, 32, 64, 768]}",
        "train.max_steps=4",
        "norm.batches=2",
        *QUIET,
    )
    model = eupe.create_model(out / "final")
    assert model.family == "convnext" and "rope_rescale_coords" not in model.overrides
    assert all(math.isfinite(r["loss"]) for r in _metrics(out))
