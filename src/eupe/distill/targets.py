"""Where a run's teacher targets come from: one interface, three sources.

    LiveTeachers        the config's teachers run on every batch (any stage, the pyramid included)
    CachedTargets       a teacher-feature cache on disk (`eupe cache-teacher`; `data.teacher_cache`)
    PrecomputedTargets  targets computed once, in memory, for a fixed set of views (`eupe demo`)

Every source gives the `Distiller` the same things: `dims` (teacher -> (cls width, patch width)),
`norm` (the `TeacherNorm` its targets are normalized with), `sides` (each teacher's native input
side, which sets the shared view size), `loader(...)` (the batches it can give targets for),
`prepare(...)` (measures TeacherNorm where it is not fixed yet; the one place that happens) and
`targets(batch, resolutions)` (normalized `EncoderOutput`s on the training device). The trainer
never asks which kind it has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ..data import build_loader
from ..errors import ConfigError
from ..models.encoder import EncoderOutput
from ..models.teacher_norm import TeacherNorm
from ..teachers import build_teacher_from_spec
from .norm import measure_norm


class TargetSource:
    """The interface (see the module docstring); subclasses set `dims`, `norm` and `sides`."""

    dims: dict[str, tuple[int, int]]
    norm: TeacherNorm
    sides: dict[str, int]

    def loader(
        self,
        data: Any,
        batch_size: int,
        view_size: int,
        seed: int,
        rank: int,
        world: int,
        device=None,
        accum=1,
    ) -> Any:
        """The batches this source gives targets for, as this rank reads them: by default the run's
        data through `build_loader` (the views are all a live teacher needs)."""
        return build_loader(data, batch_size, view_size, seed, rank, world, device, accum)

    def prepare(self, next_batch: Callable[[], Any], batches: int, progress: bool) -> None:
        """Measure TeacherNorm over `batches` batches if it is not fixed yet (only live teachers)."""

    def targets(self, batch: Any, resolutions: dict[str, int | None]) -> dict[str, EncoderOutput]:
        raise NotImplementedError


def _to(y: EncoderOutput, device: torch.device) -> EncoderOutput:
    """Stored-dtype (bf16/fp8) rows to `device` in one copy (non-blocking from pinned memory),
    upcast to float32 there: half the bytes over the bus, no float32 copy on the host."""
    return EncoderOutput(
        y.cls.to(device, non_blocking=True).float(),
        y.patches.to(device, non_blocking=True).float(),
        None,
        tuple(y.grid),
    )


# -- live teachers --------------------------------------------------------------------------------------
class LiveTeachers(TargetSource):
    """The configured teachers, frozen, run on each batch at their own (native or drawn) side."""

    def __init__(self, cfg: Any, device: torch.device):
        self.teachers = {}
        for name, spec in cfg.teachers.items():
            # built in place on the device (no 7B teacher in CPU memory); errors name teachers.<name>
            teacher = build_teacher_from_spec(name, spec, seed=cfg.seed, device=device)
            teacher = teacher.to(device).eval().requires_grad_(False)
            if cfg.stage == "pyramid":
                for r in cfg.pyramid:
                    if r % teacher.stride:
                        raise ConfigError(
                            f"pyramid: scale {r} is not a multiple of teacher {name!r}'s patch size "
                            f"{teacher.stride}; pick scales that both the student and the teachers divide"
                        )
            if cfg.train.compile:
                teacher.compile_encode()
            self.teachers[name] = teacher
        self.dims = {n: (t.cls_dim, t.patch_dim) for n, t in self.teachers.items()}
        self.sides = {n: int(t.resolution) for n, t in self.teachers.items()}
        self.norm = TeacherNorm(self.dims).to(device)

    def prepare(self, next_batch: Callable[[], Any], batches: int, progress: bool) -> None:
        if bool(self.norm.frozen):  # measured before (a resumed run keeps its statistics)
            return
        bar = tqdm(range(batches), desc="TeacherNorm", disable=not progress)
        measure_norm(self.norm, self.teachers, (next_batch().views for _ in bar))

    def targets(self, batch: Any, resolutions: dict[str, int | None]) -> dict[str, EncoderOutput]:
        out = {}
        for name, teacher in self.teachers.items():
            y = teacher(batch.views, resolutions.get(name))
            with torch.no_grad():  # normal tensors, not inference ones: they are loss targets
                out[name] = self.norm.normalize(name, y)
        return out


# -- a cache on disk ------------------------------------------------------------------------------------
class CachedTargets(TargetSource):
    """Targets read from a teacher-feature cache, with the views replayed from the source images."""

    def __init__(self, cfg: Any, device: torch.device):
        from .cache import TeacherCache

        self.cache = TeacherCache(cfg.data.teacher_cache)
        cached = self.cache.teachers
        if list(cfg.teachers) != list(cached):
            raise ConfigError(
                f"data.teacher_cache: the cache holds teachers {list(cached)}, the config names "
                f"{list(cfg.teachers)}; use the config the cache was built from"
            )
        self.dims = {n: (int(m["cls_dim"]), int(m["patch_dim"])) for n, m in cached.items()}
        self.sides = {n: int(m["resolution"]) for n, m in cached.items()}
        self.norm = self.cache.norm.to(device)  # the statistics the targets were normalized with
        self.device = device

    def loader(
        self,
        data: Any,
        batch_size: int,
        view_size: int,
        seed: int,
        rank: int,
        world: int,
        device=None,
        accum=1,
    ) -> Any:
        return self.cache.loader(data, batch_size, view_size, seed, rank, world, device)

    def targets(self, batch: Any, resolutions: dict[str, int | None]) -> dict[str, EncoderOutput]:
        return {n: _to(y, self.device) for n, y in batch.targets.items()}


# -- in memory --------------------------------------------------------------------------------------------
@dataclass
class ViewBatch:
    """A batch of views in [0,1] made by a program (benchmarks feed fixed device-side views)."""

    views: torch.Tensor
    params: list = field(default_factory=list)


class PrecomputedTargets(TargetSource):
    """Frozen networks run once over a fixed set of views (uint8 or float in [0,1], [V,3,S,S]);
    training then reads batches of those views from the run's data (one `views` source holding the
    same views, `eupe.data.sources.ViewsSource`) and their targets from memory, by view index.

    `compute` runs each network over all views and measures TeacherNorm on all of them (the same
    `measure_norm` as a live run). Patch targets are kept in float16 (unit variance after
    TeacherNorm), which halves the memory. `sides` is the stored views' side for every network:
    the targets exist already, so the shared view only has to feed the students (a larger side
    would resize every view up and back down for nothing).
    """

    def __init__(
        self,
        views: torch.Tensor,
        cls: dict[str, torch.Tensor],
        patches: dict[str, torch.Tensor],
        grids: dict[str, tuple[int, int]],
        norm: TeacherNorm,
    ):
        self.views, self.cls, self.patches, self.grids = views, cls, patches, grids
        self.dims = {n: (int(cls[n].shape[1]), int(patches[n].shape[2])) for n in cls}
        self.sides, self.norm = {n: int(views.shape[-1]) for n in cls}, norm

    @classmethod
    def compute(
        cls,
        teachers: dict[str, Callable[[torch.Tensor], EncoderOutput]],
        views: torch.Tensor,
        batch: int = 32,
        progress: bool = True,
    ) -> PrecomputedTargets:
        return cls.from_outputs(views, cls.outputs(teachers, views, batch, progress), batch)

    @staticmethod
    def outputs(
        teachers: dict[str, Callable[[torch.Tensor], EncoderOutput]],
        views: torch.Tensor,
        batch: int = 32,
        progress: bool = True,
    ) -> dict[str, EncoderOutput]:
        """Each network's raw output over all views (run `batch` views at a time), concatenated."""
        slices = [slice(i, min(len(views), i + batch)) for i in range(0, len(views), batch)]

        def as_float(v: torch.Tensor) -> torch.Tensor:
            return v.float().div_(255) if v.dtype == torch.uint8 else v

        raw: dict[str, EncoderOutput] = {}
        bar = tqdm(total=len(slices) * len(teachers), desc="teacher targets", disable=not progress)
        for name, teacher in teachers.items():
            parts = []
            for sl in slices:
                with torch.inference_mode():
                    parts.append(teacher(as_float(views[sl])))
                bar.update(1)
            cat = [torch.cat([getattr(y, k).float() for y in parts]) for k in ("cls", "patches")]
            raw[name] = EncoderOutput(*cat, None, tuple(parts[0].grid))
        bar.close()
        return raw

    @classmethod
    def from_outputs(
        cls, views: torch.Tensor, raw: dict[str, EncoderOutput], batch: int = 32
    ) -> PrecomputedTargets:
        """TeacherNorm measured on `raw` (the same `measure_norm` as a live run, over the same
        batches of `batch` views), and the normalized targets kept."""
        n = len(views)

        def part(name: str, j: int) -> EncoderOutput:
            y, sl = raw[name], slice(j * batch, min(n, (j + 1) * batch))
            return EncoderOutput(y.cls[sl], y.patches[sl], None, tuple(y.grid))

        norm = TeacherNorm({name: (y.cls.shape[-1], y.patches.shape[-1]) for name, y in raw.items()})
        measure_norm(
            norm, {name: (lambda j, name=name: part(name, j)) for name in raw}, range(-(-n // batch))
        )
        normed = {name: norm.normalize(name, y) for name, y in raw.items()}
        return cls(
            views,
            {name: y.cls for name, y in normed.items()},
            {name: y.patches.half() for name, y in normed.items()},
            {name: tuple(raw[name].grid) for name in raw},
            norm,
        )

    def loader(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        """`TargetSource.loader`, for the one set of views the targets were computed for."""
        sources = [(src.type, src.name) for src in data.sources]
        if len(sources) != 1 or sources[0][0] != "views":
            raise ConfigError(
                f"precomputed targets belong to one fixed set of views; data.sources must be that one "
                f"`views` source, got {sources}"
            )
        loader = super().loader(data, *args, **kwargs)
        if len(loader.sources[0]) != len(self.views):
            raise ConfigError(
                f"data.sources[0] holds {len(loader.sources[0])} views; the targets were computed for {len(self.views)}"
            )
        return loader

    def targets(self, batch: Any, resolutions: dict[str, int | None]) -> dict[str, EncoderOutput]:
        device = batch.views.device
        i = torch.tensor([int(p["index"]) for p in batch.params])
        return {
            n: EncoderOutput(
                self.cls[n][i].to(device), self.patches[n][i].to(device).float(), None, self.grids[n]
            )
            for n in self.dims
        }


def targets_from_config(cfg: Any, device: torch.device) -> TargetSource:
    """The source a config names: the teacher cache when `data.teacher_cache` is set, else live teachers."""
    return CachedTargets(cfg, device) if cfg.data.teacher_cache else LiveTeachers(cfg, device)
