"""The paper's teachers as named presets, and `build_teacher_from_spec`, the trainer's one entry point.

A config names teachers by key (`teachers.pe_core_g: {}`); when the key is a preset, every unset
`TeacherSpec` field takes the preset's value, so `teachers.pe_core_g.checkpoint=FILE` is enough
offline. Native resolutions follow the paper (section 4.1): 448 for PE-core/lang, 256 for DINOv3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any

import torch

from ..errors import ConfigError
from ..runtime import policy_device_type
from .base import TEACHER_BACKENDS, Teacher, build_teacher
from .spec import TeacherSpec

# Only fields that differ from TeacherSpec defaults are listed.
PRESETS: dict[str, dict[str, Any]] = {
    # PE-core has no class token: its summary is its image embedding, the attention-pooled output
    # projected into the text space (1280-d), as paper 8.1's zero-shot needs (docs/fidelity.md).
    "pe_core_g": {"model": "vit_pe_core_gigantic_patch14_448", "resolution": 448, "summary": "proj"},
    # PE-lang keeps no pooling head in timm; its summary is the model's own (average) pooled output.
    "pe_lang_g": {"model": "vit_pe_lang_gigantic_patch14_448", "resolution": 448, "summary": "head"},
    "dinov3_hplus": {"model": "vit_huge_plus_patch16_dinov3", "resolution": 256, "summary": "cls"},
    # SigLIP2 giant ("giantopt", the v2 WebLI weights); attention-pooled summary, 0.5/0.5 inputs.
    "siglip2_g": {"model": "vit_giantopt_patch16_siglip_384.v2_webli", "resolution": 384, "summary": "head"},
    "dinov3_7b": {"model": "vit_7b_patch16_dinov3", "resolution": 256, "summary": "cls"},
}

_DEFAULTS = TeacherSpec()


def known_teachers() -> dict[str, dict[str, Any]]:
    """Preset names and the TeacherSpec fields each one fills."""
    return {k: dict(v) for k, v in PRESETS.items()}


def apply_preset(name: str, spec: TeacherSpec) -> TeacherSpec:
    """A copy of `spec` with the fields it leaves at their defaults taken from preset `name`.

    A spec that names its own `model` or a non-timm backend is a different teacher that merely
    shares the key, so the preset is not applied (except a resolution/summary the user left unset
    for the very same model).
    """
    preset = PRESETS.get(name)
    if preset is None or spec.backend != "timm":
        return dataclasses.replace(spec)
    if spec.model and spec.model != preset["model"]:
        return dataclasses.replace(spec)
    filled = {
        key: value
        for key, value in preset.items()
        if getattr(spec, key) in (getattr(_DEFAULTS, key), None, "", ())
    }
    return dataclasses.replace(spec, **filled)


def _as_spec(spec: Any) -> TeacherSpec:
    """Accept a TeacherSpec, an OmegaConf node or a plain mapping."""
    if isinstance(spec, TeacherSpec):
        return spec
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(spec, DictConfig):
            spec = OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(spec, dict):
        fields = {f.name for f in dataclasses.fields(TeacherSpec)}
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise ConfigError(f"teacher spec: unknown field(s) {unknown}; known: {', '.join(sorted(fields))}")
        return TeacherSpec(**spec)
    raise ConfigError(f"teacher spec must be a TeacherSpec or a mapping; got {type(spec).__name__}")


def build_teacher_from_spec(
    name: str, spec: TeacherSpec | dict[str, Any], seed: int = 0, device: str | torch.device | None = None
) -> Teacher:
    """Build the frozen teacher `teachers.<name>` of a config: preset, validate, construct.

    `device` builds the model directly there (a 7B teacher never materializes in CPU memory, and
    random init runs on the GPU); "meta" builds without memory, for shapes and planning.

    Raises ConfigError naming the teacher for an unknown backend/model, a bad summary/patch
    source, or a resolution that is not a multiple of the patch size; CheckpointError for weights.
    """
    spec = apply_preset(name, _as_spec(spec))
    if spec.backend not in TEACHER_BACKENDS:
        raise ConfigError(
            f"teachers.{name}.backend={spec.backend!r} is unknown; known: {', '.join(sorted(TEACHER_BACKENDS))}"
        )
    if spec.backend == "timm" and not spec.model:
        raise ConfigError(
            f"teachers.{name}: unknown teacher {name!r}: not a preset ({', '.join(sorted(PRESETS))}) "
            f"and teachers.{name}.model is not set"
        )
    if spec.dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"teachers.{name}.dtype must be 'auto', 'fp32' or 'bf16'; got {spec.dtype!r}")
    if spec.dtype == "auto":  # frozen 1-7B teachers: bf16 on GPUs, exact fp32 on the CPU
        spec = dataclasses.replace(
            spec, dtype="bf16" if policy_device_type(device or "cpu") == "cuda" else "fp32"
        )
    kw = dataclasses.asdict(spec)
    backend = kw.pop("backend")
    kw.pop("weight")
    kw.pop("patch_weight")
    kw["mean"], kw["std"] = tuple(kw["mean"]), tuple(kw["std"])
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            teacher = build_teacher(backend, name=name, seed=seed, **kw)
    except ConfigError as e:
        msg = str(e)
        if "multiple" in msg and spec.resolution is not None and name in PRESETS:
            native = PRESETS[name]["resolution"]
            raise ConfigError(
                f"teacher '{name}' expects {native}x{native} input; got resolution={spec.resolution} "
                f"(must be a multiple of {_stride_from(msg)})"
            ) from None
        raise ConfigError(f"teachers.{name}: {msg}") from None
    teacher.name = name
    return teacher


def _stride_from(msg: str) -> str:
    m = re.search(r"patch size (\d+)", msg)
    return m.group(1) if m else "the patch size"
