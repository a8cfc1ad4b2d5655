"""The distillation config: typed OmegaConf dataclasses, YAML files, `key=value` overrides.

Every number of a run lives here (and in the resolved `config.yaml` the run writes). A YAML file
may list `defaults: [base.yaml, ...]`, files (relative to it) merged first, so the six paper
students share one file of Stage-2 numbers. `validate()` turns every inconsistency into one
`ConfigError` naming the field, the bad value and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ..data import DataConfig, validate_data
from ..errors import ConfigError
from ..models.zoo import STUDENTS, ZOO
from ..runtime import world_size
from ..teachers.spec import TeacherSpec

STAGES = ("fixed", "pyramid")
SINGLE = "student"  # the name of the one student of a plain run


@dataclass
class StudentConfig:
    """The encoder being trained. `init`: a `final/` folder to start from (required in Stage 3)."""

    name: str = "eupe_vitb16"
    init: str | None = None
    resolution: int = 256  # input side in stage "fixed"; pyramid scales replace it in "pyramid"
    init_heads: bool = True  # also start the adapter heads from init's heads.safetensors where they fit
    rope_rescale_coords: float | None = 2.0  # ViT training-time RoPE rescale (official recipe)
    overrides: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs, e.g. drop_path_rate
    mimetic_init: bool = False  # ViTs from scratch: mimetic attention init (eupe.models.init)
    from_scratch: bool = False  # stage "pyramid" without student.init (Table 2's "Stage 1+3" ablation)


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  # newest K kept; <= 0 keeps all
    global_batch: int = 256  # images per optimizer step, over all devices and accumulation steps
    accum_steps: int = 1  # micro-batches per optimizer step on each device
    # images per forward pass on one device; 0: global_batch / (accum_steps x world size). Set, it
    # fixes the memory per GPU at any world size and accum_steps follows: global / (micro x world)
    micro_batch: int = 0
    lr: float = 2e-5  # peak learning rate after warmup (times the lr_scaling factor)
    min_lr: float = 0.0  # cosine floor (times the lr_scaling factor)
    lr_scaling: str = "none"  # none | linear | sqrt: lr x (global_batch / lr_reference_batch)^(1 | 1/2)
    lr_reference_batch: int = 1024  # the batch `lr` is stated for when lr_scaling is linear or sqrt
    warmup_steps: int = 0
    weight_decay: float = 1e-4  # not applied to norms, biases and tokens
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 1.0  # max global grad norm; 0 disables
    bf16: bool = False  # bf16 autocast for the student and heads; bf16 FSDP all-gathers on CUDA
    compile: bool = False  # torch.compile the teachers' forward and each student block
    async_checkpoint: bool = True  # FSDP students: write DCP shards in the background (dcp.async_save)
    dist_timeout_s: float = 600.0  # how long a rank waits in a collective for one that died silently
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # CPU intra-op threads; 0 keeps PyTorch's default (1 is fastest for tiny models)
    tensorboard: bool = False  # also log to output_dir/tensorboard (needs the tensorboard package)
    progress: bool = True  # tqdm bar
    fsdp: bool | None = None  # FSDP2 under torchrun; None: only for eupe_proxy_g16 (others use DDP)
    activation_checkpointing: bool = False  # recompute student blocks in backward (less memory)
    # FSDP with accum_steps > 1: reduce-scatter gradients every micro-batch (sharded gradients only);
    # false: once per step, keeping unsharded fp32 gradients in between (4 B x parameters more)
    fsdp_reduce_every_micro: bool = True


@dataclass
class LossConfig:
    """L_i = cos(cls) + alpha * cos(patch) + beta * smoothL1(patch) (paper eq. 5)."""

    alpha: float = 0.9
    beta: float = 0.1
    smooth_l1_beta: float = 1.0


@dataclass
class HeadsConfig:
    hidden_dim: int = 3072  # paper: 1536 in Stage 1, 3072 in Stages 2/3


@dataclass
class NormConfig:
    # optimizer steps of teacher outputs (each train.accum_steps micro-batches) measured for
    # TeacherNorm before training: the paper's "500 iterations"
    batches: int = 500


@dataclass
class DistillConfig:
    output_dir: str = "runs/distill"
    seed: int = 0
    stage: str = "fixed"  # "fixed" (Stages 1, 2) or "pyramid" (Stage 3)
    pyramid: list[int] = field(default_factory=lambda: [256, 384, 512])
    teachers: dict[str, TeacherSpec] = field(default_factory=dict)
    student: StudentConfig = field(default_factory=StudentConfig)
    # family mode: name -> student; each batch runs the teachers once, then every student. A plain
    # config's `student` becomes {"student": student} here when the config loads (`load_config`),
    # so everything downstream reads `students` only.
    students: dict[str, StudentConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: LossConfig = field(default_factory=LossConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    data: DataConfig = field(default_factory=DataConfig)


# -- loading -------------------------------------------------------------------------------------
def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file with its `defaults` (files relative to it) merged underneath, recursively."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `defaults` include themselves in a cycle")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    bases = raw.pop("defaults", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create({})
    for base in bases:
        merged = OmegaConf.merge(merged, read_yaml(path.parent / str(base), (*seen, path)))
    return OmegaConf.merge(merged, raw)  # type: ignore[return-value]


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    mapping: Any = None,
) -> DistillConfig:
    """YAML file (optional), then a mapping (optional, e.g. one stage of configs/demo/full.yaml),
    then overrides -> a validated `DistillConfig`.

    Overrides are `key=value` (merged, like YAML) or `~key` (delete a mapping entry, e.g.
    `~teachers.pe_lang_g` or `~student.overrides.depth`, since merging can add but not remove).
    """
    merged: Any = OmegaConf.structured(DistillConfig)
    deletions = [o[1:] for o in overrides if o.startswith("~")]
    assignments = [o for o in overrides if not o.startswith("~")]
    bad = [o for o in assignments if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. train.lr=1e-4) or ~key")
    try:
        if path is not None:
            merged = OmegaConf.merge(merged, read_yaml(Path(path)))
        if mapping is not None:
            merged = OmegaConf.merge(merged, mapping)
        for key in deletions:
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(merged, parent_key) if parent_key else merged
            if not isinstance(parent, DictConfig) or leaf not in parent:
                raise ConfigError(f"override '~{key}': there is no {key} to delete")
            with open_dict(parent):
                del parent[leaf]
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(assignments))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {_describe(e)}") from None
    assert isinstance(cfg, DistillConfig)
    if not cfg.students:  # the single-student form, turned into the family form once
        cfg.students = {SINGLE: cfg.student}
    _derive_accum_steps(cfg.train)
    validate(cfg)
    return cfg


def _derive_accum_steps(t: TrainConfig) -> None:
    """With `train.micro_batch` set, accum_steps = global_batch / (micro_batch x world size) on this
    world size. A given accum_steps other than 1 must agree; a resumed run re-derives its own
    (`train.accum_steps` saved on another world size is replaced, see `trainer.resume`)."""
    if t.micro_batch <= 0:
        if t.micro_batch < 0:
            raise ConfigError(f"train.micro_batch must be >= 0 (0: from accum_steps); got {t.micro_batch}")
        return
    ws = world_size()
    per_step = t.micro_batch * ws
    if t.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch x world size = "
            f"{t.micro_batch} x {ws}; pick a micro-batch that divides {t.global_batch // ws}"
        )
    derived = t.global_batch // per_step
    if t.accum_steps not in (1, derived):
        raise ConfigError(
            f"train.accum_steps={t.accum_steps} and train.micro_batch={t.micro_batch} disagree on {ws} "
            f"process(es) (global batch {t.global_batch} needs accum {derived}); set only one of them"
        )
    t.accum_steps = derived


def student_key(cfg: DistillConfig, name: str) -> str:
    """How errors name a student's config section: `student` (a plain run) or `students.<name>`."""
    return "student" if list(cfg.students) == [SINGLE] else f"students.{name}"


def to_yaml(cfg: DistillConfig) -> str:
    """The resolved config, as written to `output_dir/config.yaml` (a plain run keeps its
    `student:` form; loading it again gives the same config)."""
    if list(cfg.students) == [SINGLE]:
        cfg = dataclasses.replace(cfg, students={})
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def micro_batch(cfg: DistillConfig) -> int:
    """Images per forward pass on one device."""
    return cfg.train.global_batch // (cfg.train.accum_steps * world_size())


def student_resolutions(cfg: DistillConfig) -> list[int]:
    if cfg.stage == "pyramid":
        return list(cfg.pyramid)
    return [s.resolution for s in cfg.students.values()]


# -- validation ----------------------------------------------------------------------------------
def _positive(value: float, name: str, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{name} must be {'>= 0' if zero_ok else '> 0'}; got {value}")


def validate(cfg: DistillConfig) -> None:
    """Raise ConfigError on the first inconsistent field (checks that need no model built)."""
    t = cfg.train
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)}; got {cfg.stage!r}")
    for name in ("max_steps", "log_every", "checkpoint_every", "global_batch", "accum_steps"):
        _positive(getattr(t, name), f"train.{name}")
    _positive(t.lr, "train.lr")
    for name in ("min_lr", "weight_decay", "clip_grad", "warmup_steps", "threads"):
        _positive(getattr(t, name), f"train.{name}", zero_ok=True)
    if t.warmup_steps > t.max_steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} exceeds train.max_steps={t.max_steps}")
    ws = world_size()
    if t.global_batch % (t.accum_steps * ws):
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.accum_steps x world size "
            f"= {t.accum_steps} x {ws}; pick a global batch that is a multiple of {t.accum_steps * ws}"
        )
    from .optim import LR_SCALING

    if t.lr_scaling not in LR_SCALING:
        raise ConfigError(f"train.lr_scaling must be one of {', '.join(LR_SCALING)}; got {t.lr_scaling!r}")
    _positive(t.lr_reference_batch, "train.lr_reference_batch")
    _positive(t.dist_timeout_s, "train.dist_timeout_s")
    _positive(cfg.heads.hidden_dim, "heads.hidden_dim")
    _positive(cfg.norm.batches, "norm.batches")
    _positive(cfg.distill.alpha, "distill.alpha", zero_ok=True)
    _positive(cfg.distill.beta, "distill.beta", zero_ok=True)

    for name in cfg.students:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise ConfigError(
                f"students.{name}: student names may use letters, digits, '_' and '-' "
                "(they name final/<name>/ folders and logged terms)"
            )
    for name, s in cfg.students.items():
        _validate_student(cfg, s, student_key(cfg, name))
    _validate_teachers(cfg)


def _validate_student(cfg: DistillConfig, s: StudentConfig, key: str) -> None:
    if s.name not in ZOO:
        raise ConfigError(
            f"{key}.name: unknown model {s.name!r}; students: {', '.join(STUDENTS)} "
            f"(all zoo models: {', '.join(ZOO)})"
        )
    if s.mimetic_init and (s.init or ZOO[s.name].family != "vit"):
        raise ConfigError(
            f"{key}.mimetic_init: draws fresh ViT attention weights; it needs a ViT student "
            f"({s.name} is a {ZOO[s.name].family}) and no {key}.init"
        )
    stride = ZOO[s.name].stride
    if cfg.stage == "pyramid":
        if not cfg.pyramid:
            raise ConfigError("pyramid: stage 'pyramid' needs at least one scale, e.g. [256, 384, 512]")
        for r in cfg.pyramid:
            if r <= 0 or r % stride:
                raise ConfigError(
                    f"pyramid: scale {r} is not a multiple of the patch size {stride} of {s.name} "
                    f"(nearest: {max(stride, round(r / stride) * stride)})"
                )
        if not s.init and not s.from_scratch:
            raise ConfigError(
                f"{key}.init: stage 'pyramid' (Stage 3) starts from the Stage-2 student; "
                f"set {key}.init=<stage-2 output_dir>/final (or {key}.from_scratch=true for a fresh one)"
            )
    if s.from_scratch and s.init:
        raise ConfigError(f"{key}.from_scratch=true and {key}.init={s.init!r} contradict; keep one")
    elif s.resolution <= 0 or s.resolution % stride:
        raise ConfigError(
            f"{key}.resolution={s.resolution} is not a multiple of the patch size {stride} of {s.name} "
            f"(nearest: {max(stride, round(s.resolution / stride) * stride)})"
        )


def _validate_teachers(cfg: DistillConfig) -> None:
    from ..teachers import known_teachers

    if not cfg.teachers:
        raise ConfigError("teachers: at least one teacher is needed, e.g. teachers.dinov3_hplus={}")
    presets = known_teachers()
    for name, spec in cfg.teachers.items():
        key = f"teachers.{name}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) or "__" in name:
            raise ConfigError(
                f"{key}: teacher names may use letters, digits, '_' and '-' (no '__'); they name "
                "adapter heads, TeacherNorm buffers and logged terms"
            )
        if spec.backend == "eupe":
            if not (spec.checkpoint or spec.model):
                raise ConfigError(
                    f"{key}.checkpoint is unset: the eupe backend loads a trained final/ folder; "
                    f"pass {key}.checkpoint=<stage-1 output_dir>/final"
                )
        elif not spec.model and name not in presets:
            raise ConfigError(
                f"{key}: unknown teacher {name!r}: not a preset ({', '.join(sorted(presets))}) and "
                f"{key}.model is not set"
            )
        if spec.resolution is not None and spec.resolution <= 0:
            raise ConfigError(f"{key}.resolution must be > 0; got {spec.resolution}")
        _positive(spec.weight, f"{key}.weight", zero_ok=True)
        _positive(spec.patch_weight, f"{key}.patch_weight", zero_ok=True)
        if spec.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"{key}.dtype must be 'auto', 'fp32' or 'bf16'; got {spec.dtype!r}")
    validate_data(cfg.data)
    if cfg.data.teacher_cache and cfg.stage == "pyramid":
        raise ConfigError(
            f"data.teacher_cache={cfg.data.teacher_cache!r}: a cache holds targets at the teachers' "
            "native resolution, but stage 'pyramid' draws a teacher scale per iteration; run Stage 3 "
            "with live teachers (remove data.teacher_cache)"
        )


def check_paths(cfg: DistillConfig) -> None:
    """Checks of files a run reads (separate from `validate`, so paper configs validate anywhere)."""
    for name, s in cfg.students.items():
        _check_init(s.init, student_key(cfg, name))
    if cfg.data.teacher_cache and not (Path(cfg.data.teacher_cache) / "cache.json").is_file():
        raise ConfigError(
            f"data.teacher_cache={cfg.data.teacher_cache!r}: no cache.json there; build the cache with "
            "`eupe cache-teacher CONFIG cache.dir=DIR` first"
        )


def _check_init(init: str | None, key: str) -> None:
    if init and not (Path(init) / "config.json").is_file():
        raise ConfigError(
            f"{key}.init={init!r}: not a final/ folder with config.json + model.safetensors "
            "(use the final/ folder of the previous stage's output_dir)"
        )
