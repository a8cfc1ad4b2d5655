"""Issue 6 benchmarks on CPU: trainer overhead, family speed-up, teacher-cache speed-up.

    python benchmarks/distill_scale.py overhead   # our Stage-2 step vs a bare PyTorch loop (goal <= 1.10x)
    python benchmarks/distill_scale.py family     # 3 students in one run vs 3 runs, vs the ideal ratio
    python benchmarks/distill_scale.py cache      # Stage 2 from the cache vs live teacher; build speed, bytes/view
    python benchmarks/distill_scale.py all

Each prints the ratios it measured in this run and writes benchmarks/results/distill_scale_<name>.json
(with the CPU model and the load average, since the machine may be shared). Small random models
(no downloads): the teacher is a 6-block ViT-S/16 at 128 px, the student ViT-S/16 (eupe_vits16).
Both loops of the overhead benchmark get the same pre-made views, so data loading is not in
either number (see benchmarks/data_throughput.py for that).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from eupe.distill import trainer as T
from eupe.distill.config import load_config
from eupe.distill.targets import ViewBatch

REPO = Path(__file__).resolve().parents[1]
BATCH = int(os.environ.get("EUPE_BENCH_BATCH", "16"))  # images per step
RESULTS = REPO / "benchmarks" / "results"
TEACHER = (
    "teachers={small: {backend: timm, model: vit_small_patch16_224, pretrained: false, resolution: 128, "
    "kwargs: {depth: 6}}}"
)
BASE = [
    "student.name=eupe_vits16",
    "student.resolution=128",
    "~student.overrides.depth",
    "heads.hidden_dim=768",
    "norm.batches=2",
    f"train.global_batch={BATCH}",
    "train.accum_steps=1",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.checkpoint_every=100000",
    "train.progress=false",
    "train.threads=0",  # keep the benchmark's thread count
    "data.sources=[{name: synthetic, type: synthetic, size: 256, image_size: 160}]",
]


def machine() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "torch": torch.__version__,
    }


def _config(out: Path, extra: list[str], teacher: str = TEACHER):
    drop = ["~teachers.vit_a", "~teachers.vit_b"]  # the tiny config's teachers; ours replaces them
    return load_config(
        REPO / "configs/tiny/stage1.yaml", [f"output_dir={out}", *drop, teacher, *BASE, *extra]
    )


class StepClock:
    """Times between consecutive optimizer steps of a Distiller (patched in, removed after)."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def __enter__(self) -> StepClock:
        self._orig = T.Distiller.optimizer_step
        clock = self

        def timed(distiller, s):
            norm = clock._orig(distiller, s)
            if s is list(distiller.students.values())[-1]:
                clock.marks.append(time.perf_counter())
            return norm

        T.Distiller.optimizer_step = timed
        return self

    def __exit__(self, *exc) -> None:
        T.Distiller.optimizer_step = self._orig

    def step_times(self, skip: int = 2) -> list[float]:
        return [b - a for a, b in zip(self.marks[skip:], self.marks[skip + 1 :])]


def fixed_views(n: int, batch: int, side: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(batch, 3, side, side, generator=g) for _ in range(n)]


# -- (1) overhead --------------------------------------------------------------------------------------
def ours(tmp: Path, views: list[torch.Tensor], steps: int) -> list[float]:
    cfg = _config(tmp / f"ours{time.monotonic_ns()}", [f"train.max_steps={steps}"])
    d = T.Distiller(cfg)
    it = iter(views * 100)
    d._next_batch = lambda: ViewBatch(next(it))  # the same pre-made views as the bare loop
    with StepClock() as clock:
        d.train()
    return clock.step_times()


def bare(views: list[torch.Tensor], steps: int) -> list[float]:
    """The minimal loop: teacher forward, student forward/backward, the paper loss, AdamW."""
    import eupe
    from eupe.models.heads import TeacherHeads
    from eupe.teachers import TeacherSpec, build_teacher_from_spec

    teacher = build_teacher_from_spec(
        "small",
        TeacherSpec(model="vit_small_patch16_224", pretrained=False, resolution=128, kwargs={"depth": 6}),
    )
    student = eupe.create_model("eupe_vits16", rope_rescale_coords=2.0).train()
    heads = TeacherHeads(student.embed_dim, {"small": (teacher.cls_dim, teacher.patch_dim)}, 768)
    opt = torch.optim.AdamW([*student.parameters(), *heads.parameters()], lr=2e-5, weight_decay=1e-4)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    marks = []
    for i in range(steps):
        v = views[i % len(views)]
        y = teacher(v)  # inference-mode tensors: clone into normal ones for autograd
        y_cls, y_patches = y.cls.clone(), y.patches.clone()
        out = student((v - mean) / std)
        z_cls, z_patch = heads(out, ["small"])["small"]
        loss = (
            (1 - F.cosine_similarity(z_cls, y_cls, dim=-1)).mean()
            + 0.9 * (1 - F.cosine_similarity(z_patch, y_patches, dim=-1)).mean()
            + 0.1 * F.smooth_l1_loss(z_patch, y_patches)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*student.parameters(), *heads.parameters()], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks[2:], marks[3:])]


def bench_overhead(tmp: Path, steps: int) -> dict:
    views = fixed_views(4, 16, 128)
    ours_t, bare_t = [], []
    for _ in range(2):  # interleaved, so a load change on the shared machine hits both
        bare_t += bare(views, steps)
        ours_t += ours(tmp, views, steps)
    o, b = statistics.median(ours_t), statistics.median(bare_t)
    r = {"ours_s_per_step": o, "bare_s_per_step": b, "ratio": o / b, "goal": 1.10, "steps": len(ours_t)}
    print(
        f"overhead: ours {o * 1e3:.0f} ms/step, bare loop {b * 1e3:.0f} ms/step -> {o / b:.3f}x (goal <= 1.10x)"
    )
    return r


# -- (2) family ------------------------------------------------------------------------------------------
STUDENTS = {
    "vitt": "{name: eupe_vitt16, resolution: 128}",
    "vits4": "{name: eupe_vits16, resolution: 128, overrides: {depth: 4}}",
    "cnxt": "{name: eupe_convnext_tiny, resolution: 128, overrides: {depths: [1, 1, 3, 1]}}",
}
BIG_TEACHER = (
    "teachers={big: {backend: timm, model: vit_base_patch16_224, pretrained: false, resolution: 128, "
    "kwargs: {depth: 8}}}"
)


def _timed_run(tmp: Path, extra: list[str], steps: int) -> tuple[float, float, float]:
    """Wall time of train() (setup and TeacherNorm excluded), the median steady-state step time
    (first two steps skipped) and the median teacher forward time per step."""
    cfg = _config(tmp / f"run{time.monotonic_ns()}", [f"train.max_steps={steps}", *extra], BIG_TEACHER)
    d = T.Distiller(cfg)
    d.prepare()
    teacher_times: list[float] = []
    teacher_targets = d.source.targets

    def timed(batch, res):
        t0 = time.perf_counter()
        y = teacher_targets(batch, res)
        teacher_times.append(time.perf_counter() - t0)
        return y

    d.source.targets = timed
    start = time.perf_counter()
    with StepClock() as clock:
        d.train()
    wall = time.perf_counter() - start
    return wall, statistics.median(clock.step_times()), statistics.median(teacher_times[2:])


def _student_cost(tmp: Path, name: str, steps: int) -> float:
    """Per-step cost of one student with the teacher forward taken out (teacher from a cache-like
    constant: the same targets every step)."""
    cfg = _config(
        tmp / f"s{time.monotonic_ns()}",
        [f"train.max_steps={steps}", f"student={STUDENTS[name]}"],
        BIG_TEACHER,
    )
    d = T.Distiller(cfg)
    d.prepare()
    fixed = {}
    orig = d.source.targets

    def once(batch, res):
        if not fixed:
            fixed.update(orig(batch, res))
        return fixed

    d.source.targets = once
    with StepClock() as clock:
        d.train()
    return statistics.median(clock.step_times())


def bench_family(tmp: Path, steps: int) -> dict:
    fam = "{" + ", ".join(f"{n}: {s}" for n, s in STUDENTS.items()) + "}"
    family_time, family_step, t_cost = _timed_run(tmp, [f"students={fam}"], steps)
    runs = {n: _timed_run(tmp, [f"student={s}"], steps) for n, s in STUDENTS.items()}
    separate = {n: r[0] for n, r in runs.items()}
    separate_step = {n: r[1] for n, r in runs.items()}
    steady = family_step / sum(separate_step.values())
    s_cost = {n: _student_cost(tmp, n, steps) for n in STUDENTS}
    ideal = (t_cost + sum(s_cost.values())) / (3 * t_cost + sum(s_cost.values()))
    measured = family_time / sum(separate.values())
    r = {
        "family_s": family_time,
        "separate_s": separate,
        "T_s_per_step": t_cost,
        "S_s_per_step": s_cost,
        "measured_ratio_wall": measured,
        "family_step_s": family_step,
        "separate_step_s": separate_step,
        "measured_ratio_steady": steady,
        "ideal_ratio": ideal,
        "relative_gap_steady": steady / ideal - 1,
        "goal": "within 10% of ideal",
        "steps": steps,
    }
    print(
        f"family: 3 students in one run {family_time:.1f} s vs 3 runs {sum(separate.values()):.1f} s -> "
        f"wall ratio {measured:.3f}; per steady step {family_step:.2f} s vs {sum(separate_step.values()):.2f} s "
        f"-> {steady:.3f}; ideal (T+S1+S2+S3)/(3T+S1+S2+S3) = {ideal:.3f} with T={t_cost * 1e3:.0f} ms, "
        f"S={', '.join(f'{n} {v * 1e3:.0f} ms' for n, v in s_cost.items())}; gap {100 * (steady / ideal - 1):+.1f}%"
    )
    return r


# -- (3) cache ------------------------------------------------------------------------------------------
def bench_cache(tmp: Path, steps: int, images: int, views: int, workers: int) -> dict:
    from eupe.distill.cache import CacheConfig
    from eupe.distill.cache_build import build_cache

    data = f"data.sources=[{{name: synthetic, type: synthetic, size: {images}, image_size: 160}}]"
    student = ["student.name=eupe_vitt16", data, f"data.num_workers={workers}"]
    cfg = _config(tmp / "unused", student, BIG_TEACHER)
    cache_dir = tmp / "cache"
    summary = build_cache(cfg, CacheConfig(dir=str(cache_dir), views=views, batch=16))

    def run(extra: list[str]) -> float:
        c = _config(
            tmp / f"c{time.monotonic_ns()}", [*student, f"train.max_steps={steps}", *extra], BIG_TEACHER
        )
        d = T.Distiller(c)
        with StepClock() as clock:
            d.train()
        return c.train.global_batch / statistics.median(clock.step_times())

    live, cached = run([]), run([f"data.teacher_cache={cache_dir}"])
    # read throughput of the cache alone (replay + rows), the loader the trainer uses
    from eupe.distill.cache import TeacherCache

    tc = TeacherCache(cache_dir)
    loader = tc.loader(cfg.data, 16, tc.meta["view_size"], 0, 0, 1)
    next(loader)
    t0 = time.perf_counter()
    n = 0
    for _ in range(10):
        n += len(next(loader).views)
    read = n / (time.perf_counter() - t0)
    r = {
        "live_images_per_s": live,
        "cached_images_per_s": cached,
        "speedup": cached / live,
        "build_views_per_s": summary["views_per_s"],
        "bytes_per_view": summary["bytes_per_view"],
        "read_views_per_s": read,
        "views": summary["views"],
        "dtype": summary["dtype"],
        "workers": workers,
        "teacher": "ViT-B/16, 8 blocks, 128 px (64 patch tokens x 768, cls 768)",
    }
    print(
        f"cache: Stage 2 from the cache {cached:.1f} img/s vs live teacher {live:.1f} img/s -> {cached / live:.2f}x; "
        f"build {summary['views_per_s']:.1f} views/s, {summary['bytes_per_view'] / 1024:.1f} KiB/view ({summary['dtype']}), "
        f"read {read:.0f} views/s with {workers} worker(s)"
    )
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["overhead", "family", "cache", "all"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="eupe-scale-"))
    try:
        for name in ("overhead", "family", "cache") if args.which == "all" else (args.which,):
            info = machine()
            if name == "overhead":
                r = bench_overhead(tmp, args.steps)
            elif name == "family":
                r = bench_family(tmp, args.steps)
            else:
                r = bench_cache(tmp, args.steps, args.images, args.views, args.workers)
            info["loadavg_end"] = os.getloadavg()
            path = RESULTS / f"distill_scale_{name}.json"
            path.write_text(json.dumps({"machine": info, **r}, indent=1))
            print(
                f"  machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}; {path}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
