"""Issue 12 on CPU: the multi-process path stops together, seeds per rank, resumes exactly, compiles.

Ranks are started as plain processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT), so each rank's exit code and message can be checked on its own.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eupe import runtime
from eupe.cli import main
from eupe.distill.checkpoint import list_checkpoints
from eupe.distill.config import load_config
from eupe.distill.optim import lr_scale

REPO = Path(__file__).resolve().parents[1]
STAGE1 = str(REPO / "configs/tiny/stage1.yaml")
SMALL = [  # 4 steps of global batch 8 (accum 2)
    "train.progress=false",
    "train.max_steps=4",
    "train.checkpoint_every=2",
    "train.warmup_steps=1",
    "norm.batches=2",
    "data.sources=[{name: synthetic, type: synthetic, size: 32, image_size: 64}]",
]
# a script that runs `eupe` with a NaN loss injected on rank NAN_RANK at step NAN_STEP (if set)
LAUNCH = textwrap.dedent(
    """
    import os, sys
    from eupe.distill import trainer

    loss_fn = trainer.Distiller.student_loss

    def poisoned(self, s, views, targets, resolution):
        loss, terms = loss_fn(self, s, views, targets, resolution)
        if self.rank == int(os.environ.get("NAN_RANK", -1)) and self.step + 1 == int(os.environ["NAN_STEP"]):
            loss = loss * float("nan")
        return loss, terms

    trainer.Distiller.student_loss = poisoned
    from eupe.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(tmp: Path, nproc: int, *args: str, env: dict | None = None, timeout: float = 120):
    """Run `eupe ARGS` as `nproc` ranks; returns [(exit code, stderr)] per rank and the seconds taken."""
    script = tmp / "launch.py"
    script.write_text(LAUNCH)
    port = _free_port()
    procs = []
    for rank in range(nproc):
        rank_env = {
            **os.environ,
            **(env or {}),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *args],
                cwd=REPO,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    start = time.monotonic()
    try:
        results = [(p.wait(timeout=timeout), p.stderr.read().decode()) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.stdout.close()
            p.stderr.close()
    return results, time.monotonic() - start


def _weights(final: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(final / "model.safetensors")), **load_file(str(final / "heads.safetensors"))}


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- failing together ----------------------------------------------------------------------------------
def test_nan_on_one_rank_stops_every_rank(tmp_path):
    out = tmp_path / "nan"
    results, seconds = _ranks(
        tmp_path, 2, "distill", STAGE1, f"output_dir={out}", *SMALL, env={"NAN_RANK": "1", "NAN_STEP": "3"}
    )
    assert seconds < 60
    for rank, (code, err) in enumerate(results):
        assert code == 3, f"rank {rank}: {err[-2000:]}"
        assert "training diverged at step 3: grad_norm=nan" in err, err[-2000:]
        assert "step_2" in err  # names the last good checkpoint
    assert "non-finite loss terms on rank 1" in results[1][1]
    assert [s for s, _ in list_checkpoints(out)] == [2] and not (out / "final").exists()
    assert json.loads((out / "checkpoints/step_2/trainer.json").read_text())["step"] == 2


def test_startup_error_reaches_every_rank(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    results, seconds = _ranks(tmp_path, 2, "distill", STAGE1, f"output_dir={out}", *SMALL)
    assert seconds < 60
    for rank, (code, err) in enumerate(results):
        assert code == 2, f"rank {rank}: {err[-2000:]}"
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "already holds a run" in errors[0], err[-2000:]
    assert "rank 0:" in results[1][1]  # the other rank says whose error it is


# -- seeds and resume ----------------------------------------------------------------------------------
DRAWS = [  # a student whose forward draws: drop path and RoPE jitter
    "student.overrides={depth: 2, drop_path_rate: 0.5}",
    "student.rope_rescale_coords=2.0",
]
PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from eupe.distill.config import load_config
    from eupe.distill.trainer import Distiller

    d = Distiller(load_config(sys.argv[1], sys.argv[3:]))
    s = d.students["student"]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with d.streams.use("student"):
        out = s.model(x).patches
    weights = sum(float(p.double().sum()) for p in s.model.parameters())
    with open(f"{sys.argv[2]}.{d.rank}", "w") as f:
        json.dump({"out": out.double().sum().item(), "weights": weights}, f)
    """
)


def test_ranks_share_weights_but_draw_their_own_masks(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    (tmp_path / "launch.py").write_text(LAUNCH)
    report = tmp_path / "report"
    port = _free_port()
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    args = [STAGE1, str(report), f"output_dir={tmp_path / 'run'}", *SMALL, *DRAWS]
    procs = [
        subprocess.Popen(
            [sys.executable, str(probe), *args],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1"},
            cwd=REPO,
            stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
        p.stderr.close()
    a, b = (json.loads(Path(f"{report}.{r}").read_text()) for r in range(2))
    assert a["weights"] == b["weights"]  # initialised identically ...
    assert a["out"] != b["out"]  # ... then each rank draws its own drop path / RoPE jitter


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = [*SMALL, *DRAWS, "train.keep_checkpoints=0"]
    results, _ = _ranks(tmp_path, 2, "distill", STAGE1, f"output_dir={full}", *args)
    assert all(code == 0 for code, _ in results), results[0][1][-2000:] + results[1][1][-2000:]
    shutil.copytree(full, cut)
    (cut / "config.yaml").write_text((full / "config.yaml").read_text().replace(str(full), str(cut)))
    assert sorted(p.name for p in (full / "checkpoints/step_2/rng").iterdir()) == [
        "rank_0.json",
        "rank_0.safetensors",
        "rank_1.json",
        "rank_1.safetensors",
    ]
    # as if killed during step 3: only step_2 is complete
    for p in ("checkpoints/step_4/COMPLETE", "final/model.safetensors"):
        (cut / p).unlink()
    (cut / "final/config.json").unlink()
    results, _ = _ranks(tmp_path, 2, "distill", "--resume", str(cut))
    assert all(code == 0 for code, _ in results), results[0][1][-2000:]
    a, b = _weights(full / "final"), _weights(cut / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(cut) == _losses(full)


# -- compile, norm steps, lr scaling, devices -----------------------------------------------------------
@pytest.mark.slow
def test_compiled_run_matches_eager(tmp_path):
    args = [
        *SMALL,
        "train.max_steps=3",
        "train.checkpoint_every=3",
        "student.overrides={depth: 1}",
        "~teachers.vit_b",
    ]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(["distill", STAGE1, f"output_dir={eager}", *args]) == 0
    assert main(["distill", STAGE1, f"output_dir={compiled}", *args, "train.compile=true"]) == 0
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-4)
    a, b = _weights(eager / "final"), _weights(compiled / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_teacher_norm_counts_optimizer_steps(tmp_path):
    out = tmp_path / "run"
    assert main(["distill", STAGE1, f"output_dir={out}", *SMALL, "train.max_steps=1"]) == 0
    norm = load_file(str(out / "final/teacher_norm.safetensors"))
    # norm.batches=2 optimizer steps x accum_steps 2 x micro-batch 4 images, one cls token each
    assert int(norm["vit_a__cls_count"]) == 2 * 2 * 4


def test_lr_scaling():
    def scale(*overrides: str) -> float:
        return lr_scale(load_config(STAGE1, list(overrides)).train)

    assert scale() == 1.0  # "none": train.lr is used as written
    assert scale("train.lr_scaling=linear", "train.lr_reference_batch=2") == 4.0  # global batch 8
    assert scale("train.lr_scaling=sqrt", "train.lr_reference_batch=2") == 2.0
    with pytest.raises(Exception, match="train.lr_scaling must be one of none, linear, sqrt"):
        scale("train.lr_scaling=cubic")


def test_device_from_local_rank_is_current_before_any_cuda_work(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    assert runtime.pick_device("auto") == torch.device("cuda", 3)
    assert runtime.pick_device("cuda") == torch.device("cuda", 3)
    assert runtime.pick_device("cuda:1") == torch.device("cuda", 1)
    assert calls == [("set_device", torch.device("cuda", d)) for d in (3, 3, 1)]
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(Exception, match="LOCAL_RANK=5 but this node has 4 GPU"):
        runtime.pick_device("auto")

    # in the trainer, the device is current before the process group or any model exists
    from eupe.distill import trainer

    class Stop(Exception):
        pass

    def join(device, timeout):
        calls.append(("init_distributed", device))
        raise Stop

    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(trainer, "init_distributed", join)
    calls.clear()
    with pytest.raises(Stop):
        trainer.Distiller(load_config(STAGE1, [f"output_dir={tmp_path}", "train.device=auto"]))
    assert calls == [("set_device", torch.device("cuda", 2)), ("init_distributed", torch.device("cuda", 2))]


HOST_READS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "cpu", "numpy"}


class HostReads(torch.overrides.TorchFunctionMode):
    """Records tensor -> Python reads (each one a device sync on a GPU), except inside the trainer's
    one allowed read (`read_step`'s `host_values`)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.allowed = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and not self.allowed:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_one_host_read_per_optimizer_step(tmp_path, monkeypatch):
    """What would synchronize a GPU, counted on the CPU: a quiet step and a logging step each read
    the device once, in `read_step` (benchmarks/gpu_check.py checks the same with CUDA's sync debug
    mode on a GPU)."""
    from eupe.distill import parallel
    from eupe.distill.trainer import Distiller

    args = [f"output_dir={tmp_path}", *SMALL, *DRAWS, "train.log_every=2", "train.accum_steps=2"]
    d = Distiller(load_config(STAGE1, args))
    d.prepare()
    mode, calls = HostReads(), []
    real = parallel.host_values

    def allowed(t):
        calls.append(1)
        mode.allowed += 1
        try:
            return real(t)
        finally:
            mode.allowed -= 1

    def excluded(method):  # host-side by design: the data path (CPU workers on a GPU node) and
        def run(*a):  # AdamW's CPU loop reading its CPU step counters (CUDA uses the fused kernel)
            mode.allowed += 1
            try:
                return method(*a)
            finally:
                mode.allowed -= 1

        return run

    monkeypatch.setattr(parallel, "host_values", allowed)
    d._next_batch = excluded(d._next_batch)
    d.optimizer_step = excluded(d.optimizer_step)
    d._window = (0, time.perf_counter())
    with mode:
        for _ in range(2):  # step 1 quiet, step 2 logs
            d.train_step()
    assert mode.reads == [] and len(calls) == 2
