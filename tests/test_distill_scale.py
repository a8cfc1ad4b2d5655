"""Issue 6 on tiny CPU runs: torchrun/gloo equals one process, family mode equals separate runs,
FSDP2 checkpoints reload on another world size, and the teacher cache replays exactly."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eupe.cli import main
from eupe.distill.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
STAGE1 = str(REPO / "configs/tiny/stage1.yaml")
SMALL = [  # 4 steps of global batch 8 (accum 2), TeacherNorm over 2 optimizer steps
    "train.progress=false",
    "train.max_steps=4",
    "train.checkpoint_every=2",
    "norm.batches=2",
    "data.sources=[{name: synthetic, type: synthetic, size: 32, image_size: 64}]",
]
# each rank draws its own RoPE jitter; without it, one process and two compute the same numbers
NO_JITTER = [*SMALL, "student.rope_rescale_coords=null"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _distill(*args: str) -> None:
    assert main(["distill", *args]) == 0


def _losses(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(final: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(final / "model.safetensors")), **load_file(str(final / "heads.safetensors"))}


def _torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "-m", "eupe", "distill", *args], cwd=REPO, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]


# -- torchrun -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "one"
    _distill(STAGE1, f"output_dir={out}", *NO_JITTER)
    return out


def test_two_gloo_processes_equal_one_process(one_process, tmp_path):
    """Same global batch (8 = 2 ranks x 2 images x 2 accumulation): same loss curve and weights."""
    out = tmp_path / "two"
    _torchrun(2, STAGE1, f"output_dir={out}", *NO_JITTER)
    one, two = _losses(one_process), _losses(out)
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
    # the logged terms are means over the global batch too
    assert _losses(out, "loss/vit_b/patch_cos") == pytest.approx(
        _losses(one_process, "loss/vit_b/patch_cos"), rel=1e-5
    )
    a, b = _weights(one_process / "final"), _weights(out / "final")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # rank 0 wrote everything once: the same checkpoints as the lone process
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]


def test_fsdp_checkpoint_resumes_on_another_world_size(one_process, tmp_path):
    """FSDP2 on CPU/gloo: sharded DCP checkpoints; a 1-process resume from step 2 reproduces the run."""
    out = tmp_path / "fsdp"
    _torchrun(2, STAGE1, f"output_dir={out}", "train.fsdp=true", "train.keep_checkpoints=0", *NO_JITTER)
    ckpt = out / "checkpoints" / "step_2" / "students" / "student"
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert _losses(out) == pytest.approx(_losses(one_process), rel=1e-5)
    a, b = _weights(one_process / "final"), _weights(out / "final")  # gathered to rank 0
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # as if killed after step 2: continue in one process (world size 1), resharding the DCP shards
    shutil.rmtree(out / "checkpoints" / "step_4")
    shutil.rmtree(out / "final")
    _distill("--resume", str(out))
    assert _losses(out) == pytest.approx(_losses(one_process), rel=1e-5)
    b = _weights(out / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# the GPU's policies (bf16 teachers, fused AdamW, FSDP's bf16 mixed precision, channels_last ConvNeXt)
# on CPU processes: the code paths a GPU run takes, with gloo
GPU_POLICIES = """
import sys
from eupe.cli import main
from eupe.runtime import policies_for
with policies_for("cuda"):
    code = main(sys.argv[1:])
sys.exit(code)
"""


@pytest.mark.slow
def test_convnext_under_fsdp_steps_with_the_gpu_policies(tmp_path):
    """A ConvNeXt student with train.fsdp=true on 2 gloo processes: the GPU's channels_last layout
    must not reach `fully_shard`, which shards contiguous parameters only."""
    script = tmp_path / "gpu_policies.py"
    script.write_text(GPU_POLICIES)
    out = tmp_path / "convnext"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script)]
    args = [
        "distill",
        STAGE1,
        f"output_dir={out}",
        "student.name=eupe_convnext_tiny",
        "~student.overrides.depth",
        "student.overrides.depths=[1, 1, 1, 1]",
        "student.overrides.dims=[16, 32, 64, 768]",
        "train.fsdp=true",
        "train.bf16=true",
        *SMALL,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    losses = _losses(out)
    assert len(losses) == 4 and all(0 < v < 100 for v in losses)
    assert (out / "final" / "model.safetensors").is_file()


# -- family mode --------------------------------------------------------------------------------------
FAMILY = {
    "d1": "{name: eupe_vitt16, resolution: 64, overrides: {depth: 1, drop_path_rate: 0.2}}",
    "d2": "{name: eupe_vitt16, resolution: 64, overrides: {depth: 2, drop_path_rate: 0.3}}",
}


def test_family_equals_separate_runs(tmp_path):
    family = tmp_path / "family"
    students = "{" + ", ".join(f"{n}: {spec}" for n, spec in FAMILY.items()) + "}"
    _distill(STAGE1, f"output_dir={family}", f"students={students}", *SMALL)
    assert sorted(p.name for p in (family / "final").iterdir()) == ["d1", "d2"]
    ckpt = list_checkpoints(family)[-1][1]
    assert sorted(p.name for p in (ckpt / "students").iterdir()) == ["d1", "d2"]
    rows = [json.loads(line) for line in (family / "metrics.jsonl").read_text().splitlines()]
    for name, spec in FAMILY.items():
        alone = tmp_path / name
        _distill(STAGE1, f"output_dir={alone}", f"student={spec}", *SMALL)
        a, b = _weights(alone / "final"), _weights(family / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert [r[f"{name}/loss"] for r in rows] == _losses(alone)


def test_family_pyramid_draws_do_not_depend_on_other_students(tmp_path):
    """Stage 3: each student gets the scale a lone run of the seed draws; drop path per stream."""
    s2 = tmp_path / "s2"
    _distill(STAGE1, f"output_dir={s2}", f"student={FAMILY['d1']}", *SMALL)
    pyramid = ["stage=pyramid", "pyramid=[32,48,64]", "train.max_steps=3"]
    spec = FAMILY["d1"][:-1] + f", init: {s2}/final}}"
    family = tmp_path / "family"
    _distill(STAGE1, f"output_dir={family}", f"students={{a: {spec}, b: {spec}}}", *SMALL, *pyramid)
    alone = tmp_path / "alone"
    _distill(STAGE1, f"output_dir={alone}", f"student={spec}", *SMALL, *pyramid)
    want = _weights(alone / "final")
    for name in ("a", "b"):
        got = _weights(family / "final" / name)
        assert all(torch.equal(want[k], got[k]) for k in want), name


# -- teacher cache ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache") / "c"
    data = "data.sources=[{name: synthetic, type: synthetic, size: 6, image_size: 64}]"
    assert (
        main(
            ["cache-teacher", STAGE1, f"cache.dir={root}", "cache.views=3", "cache.shard_views=7"]
            + ["train.progress=false", "norm.batches=2", data]
        )
        == 0
    )
    return root


def test_cache_replay_is_exact(cache):
    from eupe.data import load_source_image, open_sources, replay_view
    from eupe.distill.cache import TeacherCache
    from eupe.distill.config import load_config
    from eupe.teachers import build_teacher_from_spec

    tc = TeacherCache(cache)
    meta = tc.meta
    assert meta["views"] == 18 and meta["images"] == 6 and meta["dtype"] == "bf16"
    assert len(list(cache.glob("shard_r0_*.safetensors"))) == 3  # 7 + 7 + 4 rows
    cfg = load_config(STAGE1, ["data.sources=[{name: synthetic, type: synthetic, size: 6, image_size: 64}]"])
    sources = open_sources(cfg.data, cfg.seed)
    teachers = {n: build_teacher_from_spec(n, s, seed=cfg.seed) for n, s in cfg.teachers.items()}
    assert {e["params"]["flip"] for e in tc.entries} == {True, False}  # flips are views of their own
    views = torch.stack(
        [
            replay_view(load_source_image(sources, e["params"]), e["params"], meta["view_size"])
            for e in tc.entries
        ]
    )
    dataset = tc.loader(cfg.data, 4, meta["view_size"], 0, 0, 1).dataset
    for name, teacher in teachers.items():
        fresh = tc.norm.normalize(name, teacher(views))
        rows = [dataset._rows(e["shard"], e["row"])[name] for e in tc.entries]
        cached_cls = torch.stack([r[0] for r in rows]).float()
        cached_patches = torch.stack([r[1] for r in rows]).float()
        cos_cls = torch.nn.functional.cosine_similarity(cached_cls, fresh.cls, dim=-1)
        cos_patch = torch.nn.functional.cosine_similarity(cached_patches, fresh.patches, dim=-1)
        assert cos_cls.min() > 0.999 and cos_patch.min() > 0.999, (name, cos_cls.min(), cos_patch.min())
        assert cached_patches.dtype == torch.float32 and rows[0][1].dtype == torch.bfloat16


def test_distill_from_cache_resumes_and_matches_live_norm(cache, tmp_path):
    data = "data.sources=[{name: synthetic, type: synthetic, size: 6, image_size: 64}]"
    out = tmp_path / "cached"
    args = [STAGE1, f"output_dir={out}", f"data.teacher_cache={cache}", "data.num_workers=2", data]
    _distill(*args, *SMALL[:4])
    losses = _losses(out)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    norm = load_file(str(out / "final" / "teacher_norm.safetensors"))
    assert all(torch.equal(norm[k], v) for k, v in load_file(str(cache / "teacher_norm.safetensors")).items())
    # the same run read in-process (no workers), the photometric half batched on the training
    # device (data.device_augment; the CPU here), gives the same weights
    again = tmp_path / "again"
    args = [
        f"output_dir={again}",
        f"data.teacher_cache={cache}",
        "data.num_workers=0",
        "data.device_augment=true",
    ]
    _distill(STAGE1, *args, data, *SMALL[:4])
    a, b = _weights(out / "final"), _weights(again / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cache_errors_name_the_field(tmp_path, capsys):
    assert main(["cache-teacher", STAGE1, "cache.views=2"]) == 2
    assert "cache.dir is unset" in capsys.readouterr().err
    assert main(["distill", STAGE1, f"output_dir={tmp_path}/x", f"data.teacher_cache={tmp_path}"]) == 2
    assert "no cache.json" in capsys.readouterr().err
