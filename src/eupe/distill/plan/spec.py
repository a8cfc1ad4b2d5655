"""What `eupe plan` reads from a distill config: the networks, their resolutions, batch and steps.

Configs load through the same schema as `eupe distill` (eupe.distill.config) but skip the checks
that need files on disk, because a plan is made before the Stage-1 proxy or `student.init` exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
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
    dataset_size: int | None = None


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
    s = cfg.student
    student_res = pyramid if stage == "pyramid" else [int(s.resolution)]
    student = NetSpec("eupe", s.name, student_res, dict(s.overrides or {}))
    teachers = {t: _teacher_spec(t, spec, stage, pyramid, arch) for t, spec in cfg.teachers.items()}
    data = getattr(cfg, "data", None)
    size = next(
        (getattr(data, k) for k in ("size", "num_images", "dataset_size") if getattr(data, k, None)), None
    )
    return PlanSpec(
        name=name,
        student=student,
        teachers=teachers,
        hidden_dim=int(cfg.heads.hidden_dim),
        global_batch=int(cfg.train.global_batch),
        max_steps=int(cfg.train.max_steps),
        accum_steps=int(getattr(cfg.train, "accum_steps", 1)),
        dataset_size=int(size) if size else None,
    )


def _yaml_with_defaults(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """Fallback reader: a YAML file with its `defaults: [files]` merged underneath (as config.py does)."""
    from omegaconf import OmegaConf

    path = path.resolve()
    if path in seen or not path.is_file():
        raise ConfigError(f"{path}: no such config file (or a `defaults` cycle)")
    raw = OmegaConf.load(path)
    bases = raw.pop("defaults", None) or []
    merged = OmegaConf.create({})
    for base in [bases] if isinstance(bases, str) else bases:
        merged = OmegaConf.merge(merged, _yaml_with_defaults(path.parent / str(base), (*seen, path)))
    return OmegaConf.merge(merged, raw)


def _plain_config(path: str, overrides: list[str] | tuple[str, ...]) -> Any:
    """The fields plan reads, with DistillConfig's defaults, straight from YAML (no schema needed)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from ...teachers.spec import TeacherSpec

    merged = OmegaConf.merge(_yaml_with_defaults(Path(path)), OmegaConf.from_dotlist(list(overrides)))
    d = OmegaConf.to_container(merged, resolve=True)
    assert isinstance(d, dict)
    student, train, heads = d.get("student") or {}, d.get("train") or {}, d.get("heads") or {}
    teachers = {k: TeacherSpec(**(v or {})) for k, v in (d.get("teachers") or {}).items()}
    return SimpleNamespace(
        stage=d.get("stage", "fixed"),
        pyramid=d.get("pyramid", [256, 384, 512]),
        student=SimpleNamespace(
            name=student.get("name", "eupe_vitb16"),
            resolution=student.get("resolution", 256),
            overrides=student.get("overrides") or {},
        ),
        teachers=teachers,
        heads=SimpleNamespace(hidden_dim=heads.get("hidden_dim", 3072)),
        train=SimpleNamespace(
            global_batch=train.get("global_batch", 256),
            max_steps=train.get("max_steps", 1000),
            accum_steps=train.get("accum_steps", 1),
        ),
        data=SimpleNamespace(**(d.get("data") or {})),
    )


def load_plan_spec(
    path: str, overrides: list[str] | tuple[str, ...] = (), arch: dict[str, str] | None = None
) -> PlanSpec:
    """Read a distill YAML through the config schema of `eupe distill` (eupe.distill.config), without
    the checks that need files on disk: a plan is made before `student.init` and the Stage-1 proxy
    exist. The `data` section is read as plain YAML (plan needs only an optional dataset size
    from it). If the schema module cannot be imported, the whole YAML is read with OmegaConf."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        from ..config import DistillConfig, _read_yaml
    except ImportError:
        cfg = _plain_config(path, overrides)
        return spec_from_config(cfg, name=os.path.basename(str(path)), arch=arch)
    try:
        raw = OmegaConf.merge(_read_yaml(Path(path)), OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(raw.pop("data", None) or OmegaConf.create({}), resolve=True)
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DistillConfig), raw))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: invalid config: {str(e).splitlines()[0]}") from None
    spec = spec_from_config(cfg, name=os.path.basename(str(path)), arch=arch)
    size = next(
        (data[k] for k in ("size", "num_images", "dataset_size") if isinstance(data, dict) and data.get(k)),
        None,
    )
    spec.dataset_size = int(size) if size else spec.dataset_size
    return spec
