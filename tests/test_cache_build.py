"""`eupe cache-teacher` under torchrun (a slow shard, the final count on the device) and the cached
targets' one copy to the device (rows stay in the stored dtype until they get there)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from eupe.cli import main
from eupe.distill import cache_build
from eupe.distill.cache import CacheConfig, TeacherCache
from eupe.distill.config import load_config
from eupe.distill.targets import CachedTargets
from eupe.models import TeacherNorm

REPO = Path(__file__).resolve().parents[1]
STAGE1 = str(REPO / "configs/tiny/stage1.yaml")
SMALL = ["train.progress=false", "norm.batches=2", "data.num_workers=0"]
DATA = "data.sources=[{name: synthetic, type: synthetic, size: 6, image_size: 64}]"
# `eupe ARGS` with rank SLOW_RANK sleeping SLOW_S seconds on its first image (after TeacherNorm)
LAUNCH = textwrap.dedent(
    """
    import os, sys, time
    from eupe.distill import cache_build

    get = cache_build._ImageViews.__getitem__

    def slow(self, i):
        if i == 0 and os.environ["RANK"] == os.environ["SLOW_RANK"]:
            time.sleep(float(os.environ["SLOW_S"]))
        return get(self, i)

    cache_build._ImageViews.__getitem__ = slow
    from eupe.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_two_ranks_sum_their_counts_past_a_slow_shard(tmp_path):
    """Rank 1 finishes its shard long after rank 0 (longer than train.dist_timeout_s): both wait for
    it on the finish group, and cache.json counts the views of both ranks."""
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    root = tmp_path / "c"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    cmd += ["cache-teacher", STAGE1, f"cache.dir={root}", "cache.views=3"]
    cmd += [*SMALL, DATA, "train.dist_timeout_s=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLOW_RANK": "1", "SLOW_S": "12"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    meta = json.loads((root / "cache.json").read_text())
    assert (meta["world_size"], meta["views"], meta["images"], meta["skipped"]) == (2, 18, 6, 0)
    per_rank = [len(json.loads((root / f"index_r{r}.json").read_text())) for r in range(2)]
    assert per_rank == [9, 9]
    assert meta["bytes"] == sum(p.stat().st_size for p in root.glob("shard_r*.safetensors"))


class _Reached(Exception):
    """The final reduction was reached (a meta tensor has no values to read back)."""


def test_final_reduction_runs_on_the_run_device(tmp_path, monkeypatch):
    """NCCL reduces device tensors only: the counts go to the run's device (here `meta`, standing
    in for a GPU), after every rank met on the finish group with the cache's timeout."""
    events = []

    def all_reduce(t, *args, **kwargs):
        events.append(("all_reduce", t.device.type))
        raise _Reached

    def measure_norm(cfg, teachers, view_size, device, *args):  # meta teachers give no statistics
        return TeacherNorm({n: (t.cls_dim, t.patch_dim) for n, t in teachers.items()}).to(device)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cache_build, "pick_device", lambda name, **_: torch.device("meta"))
    monkeypatch.setattr(cache_build, "_measure_norm", measure_norm)
    # the fake backend cannot make a gloo group: the real one is the test above
    monkeypatch.setattr(
        dist, "new_group", lambda backend, timeout: ("finish", backend, timeout.total_seconds())
    )
    monkeypatch.setattr(dist, "barrier", lambda group=None: events.append(("barrier", group)))
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    # rank 1 of 2 with one image: its shard is empty, so no teacher runs on the meta device
    cfg = load_config(
        STAGE1, [*SMALL, "data.sources=[{name: synthetic, type: synthetic, size: 1, image_size: 64}]"]
    )
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        with pytest.raises(_Reached):
            cache_build.build_cache(cfg, CacheConfig(dir=str(tmp_path / "c"), finish_timeout_s=77.0))
    finally:
        dist.destroy_process_group()
    assert events == [("barrier", ("finish", "gloo", 77.0)), ("all_reduce", "meta")]


def test_cached_targets_reach_the_device_as_float32_once(tmp_path):
    """The loader hands over the stored bf16 rows (pinned by its DataLoader on a GPU run); the one
    copy to the device upcasts them there, to the rows' values."""
    root = tmp_path / "c"
    assert main(["cache-teacher", STAGE1, f"cache.dir={root}", "cache.views=2", *SMALL, DATA]) == 0
    cfg = load_config(STAGE1, [*SMALL, DATA, f"data.teacher_cache={root}"])
    cache = TeacherCache(root)
    loader = cache.loader(cfg.data, 4, cache.meta["view_size"], 0, 0, 1)
    batch = next(loader)
    got = CachedTargets(cfg, torch.device("cpu")).targets(batch, {})
    assert list(got) == list(batch.targets) == ["vit_a", "vit_b"]
    for name, y in batch.targets.items():
        assert y.cls.dtype == y.patches.dtype == torch.bfloat16
        assert got[name].cls.dtype == got[name].patches.dtype == torch.float32
        for j, p in enumerate(batch.params):
            e = next(e for e in loader.dataset.entries if e["params"] == p)
            cls, patches = loader.dataset._rows(e["shard"], e["row"])[name]
            assert torch.equal(got[name].cls[j], cls.float())
            assert torch.equal(got[name].patches[j], patches.float())
