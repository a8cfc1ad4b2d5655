"""What `eupe plan` reads from a distill config: the networks, their resolutions, batch and steps.

Configs load through the same schema as `eupe distill` (eupe.distill.config) but skip the checks
that need files on disk, because a plan is made before the Stage-1 proxy or `student.init` exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigError

DEFAULT_PROXY = "eupe_proxy_g16"


@dataclass
class NetSpec:
    """One network of a run: how to build it and the input sides it sees (uniform draw if several)."""

    backend: str  # "timm" or "eupe"
    model: str  # timm name, or zoo name / final/ folder
    resolutions: list[int]
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # an assumption made while reading the config


@dataclass
class PlanSpec:
    """What `eupe plan` needs from a distill config (and nothing else)."""

    name: str
    student: NetSpec
    teachers: dict[str, NetSpec]
    hidden_dim: int
    global_batch: int
    max_steps: int
    accum_steps: int = 1
    micro_batch: int = 0  # train.micro_batch: images per GPU per forward, whatever the GPU count
    fsdp: bool | None = None  # train.fsdp (None: FSDP for students over 1B, the proxy)
    activation_checkpointing: bool = False  # train.activation_checkpointing
    dataset_size: int | None = None
    # family runs: every student by name (`student` is then the first); empty for a lone student
    students: dict[str, NetSpec] = field(default_factory=dict)

    def student_nets(self) -> dict[str, NetSpec]:
        """Cost key -> student: "student" for a lone run, "student <name>" for each of a family."""
        if not self.students:
            return {"student": self.student}
        return {f"student {n}": net for n, net in self.students.items()}


# --- reading a distill config ---------------------------------------------------------------------
def _teacher_spec(name: str, spec: Any, stage: str, pyramid: list[int], arch: dict[str, str]) -> NetSpec:
    from ...teachers.presets import apply_preset

    spec = apply_preset(name, spec)  # `teachers.pe_core_g: {}` -> model, native resolution
    backend, model, res, note = spec.backend, spec.model or "", spec.resolution, ""
    if backend == "eupe":
        source = spec.checkpoint or model
        if name in arch:
            model, note = arch[name], f"sized as {arch[name]} (--arch)"
        elif source and os.path.isfile(os.path.join(source, "config.json")):
            model = source
        else:
            from ...models import ZOO

            model = source if source in ZOO else DEFAULT_PROXY
            if model == DEFAULT_PROXY and source != DEFAULT_PROXY:
                note = (
                    f"{source or '(unset)'} does not exist yet: sized as {DEFAULT_PROXY} (--arch {name}=...)"
                )
    elif backend != "timm":
        raise ConfigError(f"teachers.{name}.backend={backend!r}: plan can size 'timm' and 'eupe' teachers")
    elif not model:
        raise ConfigError(f"teachers.{name}.model is unset and {name!r} is not a teacher preset")
    if res is None and backend == "timm":
        res = _timm_native(model)
    if stage == "pyramid":
        resolutions = list(pyramid)
    elif res is None:
        raise ConfigError(f"teachers.{name}.resolution is unset; set it to the teacher's native input side")
    else:
        resolutions = [int(res)]
    return NetSpec(backend, model, resolutions, dict(spec.kwargs or {}), note)


def _timm_native(model: str) -> int | None:
    import timm

    try:
        return int(timm.get_pretrained_cfg(model).input_size[-1])  # type: ignore[union-attr]
    except Exception:
        return None


def spec_from_config(cfg: Any, name: str = "config", arch: dict[str, str] | None = None) -> PlanSpec:
    """A `DistillConfig` (eupe.distill.config) -> PlanSpec. `arch` names the zoo architecture of
    eupe-backend teachers whose final/ folder does not exist yet (default: the 1.9B proxy)."""
    arch = dict(arch or {})
    unknown = sorted(set(arch) - set(cfg.teachers))
    if unknown:
        raise ConfigError(
            f"--arch names {unknown}, which are not teachers of this config ({', '.join(cfg.teachers)})"
        )
    stage, pyramid = cfg.stage, [int(r) for r in cfg.pyramid]
    students = {
        n: NetSpec(
            "eupe", s.name, pyramid if stage == "pyramid" else [int(s.resolution)], dict(s.overrides or {})
        )
        for n, s in cfg.students.items()
    }
    teachers = {t: _teacher_spec(t, spec, stage, pyramid, arch) for t, spec in cfg.teachers.items()}
    return PlanSpec(
        name=name,
        student=next(iter(students.values())),
        students=students if len(students) > 1 else {},
        teachers=teachers,
        hidden_dim=int(cfg.heads.hidden_dim),
        global_batch=int(cfg.train.global_batch),
        max_steps=int(cfg.train.max_steps),
        accum_steps=int(cfg.train.accum_steps),
        micro_batch=int(cfg.train.micro_batch),
        fsdp=cfg.train.fsdp,
        activation_checkpointing=bool(cfg.train.activation_checkpointing),
    )


def load_plan_spec(
    path: str, overrides: list[str] | tuple[str, ...] = (), arch: dict[str, str] | None = None
) -> PlanSpec:
    """Read a distill config exactly as `eupe distill` does (same schema, `defaults`, `key=value` and
    `~key` overrides, validation). Files on disk are not checked (`check_paths` is separate): a plan
    is made before `student.init` and the Stage-1 proxy exist. The dataset size comes from
    `--dataset-size`."""
    from ..config import load_config

    return spec_from_config(load_config(path, overrides), name=os.path.basename(str(path)), arch=arch)
