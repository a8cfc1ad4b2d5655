"""What differs between the stages: the student (fresh or from `student.init`), its input, and the
resolution each network sees per iteration ("fixed": native / `student.resolution`; "pyramid":
an independent random draw from the pyramid for the student and for each teacher).

`StudentState` bundles everything trainable that belongs to one student (model, adapter heads,
optimizer, schedule), so a run with several students (one teacher forward, many students) is a
dict of these.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..models.encoder import Encoder
from ..models.heads import HEADS_FILE, TeacherHeads
from ..models.init import mimetic_init_
from ..models.loading import CONFIG_NAME, load_weights
from ..models.preprocess import Normalize, resize
from ..models.zoo import ZOO
from .checkpoint import load_state, save_state
from .config import DistillConfig, StudentConfig
from .optim import CosineSchedule, build_optimization


def student_overrides(cfg: StudentConfig) -> dict[str, Any]:
    """timm overrides for the student: the init folder's, then the config's, then the RoPE rescale."""
    overrides: dict[str, Any] = {}
    if cfg.init:
        saved = json.loads((Path(cfg.init) / CONFIG_NAME).read_text())
        if saved.get("arch") != cfg.name:
            raise ConfigError(
                f"student.init={cfg.init!r} holds a {saved.get('arch')!r}, but student.name={cfg.name!r}; "
                "make them match"
            )
        overrides.update(saved.get("overrides") or {})
    overrides.update(cfg.overrides)
    if ZOO[cfg.name].family == "vit" and cfg.rope_rescale_coords is not None:
        overrides["rope_rescale_coords"] = cfg.rope_rescale_coords
    return overrides


def build_student(cfg: StudentConfig, device: torch.device | str | None = None) -> Encoder:
    """The student encoder, with `student.init` weights loaded strictly when set."""
    overrides = student_overrides(cfg)
    try:
        with torch.device(device or "cpu"):
            model = Encoder(arch=cfg.name, overrides=overrides or None)
    except TypeError as e:  # a timm kwarg this architecture does not take
        raise ConfigError(
            f"student.overrides={overrides} do not fit {cfg.name} ({e}); remove the key, e.g. "
            "~student.overrides.depth"
        ) from None
    if cfg.init:
        load_weights(model, cfg.init)
    elif cfg.mimetic_init:
        mimetic_init_(model)
    return model


def load_matching_heads(heads: TeacherHeads, init: str) -> list[str]:
    """Copy the heads of `init/heads.safetensors` whose teacher name and shapes match; returns their names.

    Stage 3 fine-tunes the Stage-2 student against the same proxy, so its heads continue too
    instead of starting from random projections that would first disturb the student.
    """
    if not (Path(init) / HEADS_FILE).is_file():
        return []
    old = TeacherHeads.load(init)
    if (old.student_dim, old.hidden_dim) != (heads.student_dim, heads.hidden_dim):
        return []
    reused = [
        t for t, dims in heads.teacher_dims.items() if tuple(old.teacher_dims.get(t, ())) == tuple(dims)
    ]
    with torch.no_grad():
        for t in reused:
            heads.cls[t].load_state_dict(old.cls[t].state_dict())
            heads.patch[t].load_state_dict(old.patch[t].state_dict())
    return reused


def student_dim(model: Encoder) -> int:
    """Width of the student's output tokens (follows timm overrides such as embed_dim)."""
    return int(getattr(model.backbone, "num_features", model.embed_dim))


def prepare_student(views: torch.Tensor, resolution: int, normalize: Normalize) -> torch.Tensor:
    """[0,1] views -> resized to `resolution` and ImageNet-normalized, the student's input."""
    return normalize(resize(views, resolution))


class ScaleSampler:
    """Seeded draws from the resolution pyramid; its state is checkpointed (JSON)."""

    def __init__(self, scales: list[int], seed: int):
        self.scales = list(scales)
        self.rng = random.Random(seed)

    def draw(self) -> int:
        return self.scales[self.rng.randrange(len(self.scales))]

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


def draw_resolutions(
    cfg: DistillConfig, sampler: ScaleSampler, teachers: list[str], students: list[str]
) -> tuple[dict[str, int | None], dict[str, int]]:
    """This iteration's input sides: None = the teacher's native resolution.

    In a family run every student gets the one student draw a lone run of the same seed makes,
    so no student's scales depend on the others (issue 6: family equals separate runs).
    """
    if cfg.stage != "pyramid":
        return {t: None for t in teachers}, {s: cfg.students[s].resolution for s in students}
    drawn = {t: sampler.draw() for t in teachers}
    side = sampler.draw()
    return drawn, {s: side for s in students}


@dataclass
class StudentState:
    """One student and everything that trains with it."""

    name: str
    model: Encoder
    heads: TeacherHeads
    optimizer: torch.optim.AdamW
    schedule: CosineSchedule
    reused_heads: list[str] = field(default_factory=list)  # teachers whose heads came from student.init
    runner: Any = None  # its DDP/FSDP forward under torchrun (parallel.wrap_student); None alone
    sharded: bool = False  # FSDP: parameters and checkpoints are sharded over ranks

    @classmethod
    def build(
        cls,
        name: str,
        cfg: DistillConfig,
        student_cfg: StudentConfig,
        teacher_dims: dict[str, tuple[int, int]],
        device: torch.device,
    ) -> StudentState:
        model = build_student(student_cfg, device).train()
        heads = TeacherHeads(student_dim(model), teacher_dims, cfg.heads.hidden_dim).to(device).train()
        reused = (
            load_matching_heads(heads, student_cfg.init)
            if student_cfg.init and student_cfg.init_heads
            else []
        )
        optimizer, schedule = build_optimization([("model", model), ("heads", heads)], cfg.train, device)
        return cls(name, model, heads, optimizer, schedule, reused)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.model.parameters(), *self.heads.parameters()]

    def save(self, directory: Path) -> None:
        """model/heads/optimizer/schedule as safetensors + JSON under `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        save_state(directory, "model", self.model.state_dict())
        save_state(directory, "heads", self.heads.state_dict())
        save_state(directory, "optimizer", self.optimizer.state_dict())
        save_state(directory, "schedule", self.schedule.state_dict())

    def load(self, directory: Path) -> None:
        self.model.load_state_dict(load_state(directory, "model"), strict=True)
        self.heads.load_state_dict(load_state(directory, "heads"), strict=True)
        self.optimizer.load_state_dict(load_state(directory, "optimizer"))
        self.schedule.load_state_dict(load_state(directory, "schedule"))
