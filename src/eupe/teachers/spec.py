"""`TeacherSpec`: the config entry for one teacher (`teachers.<name>.*` in a distill config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TeacherSpec:
    """How to build one frozen teacher. Unset fields take the preset's value (see `PRESETS`).

    backend: "timm" | "onnx" | "eupe" (a checkpoint this project trained) | any registered backend.
    model: timm model name, ONNX file, or eupe `final/` folder / zoo name, depending on backend.
    checkpoint: local weights file (timm backend) or the eupe folder (eupe backend).
    pretrained: timm backend only: fetch the hub weights when no checkpoint is given (online). False
        builds a randomly initialised model (tests, tiny configs), seeded from the run seed.
    kwargs: extra keyword arguments for the model constructor (e.g. timm depth/embed_dim for tiny teachers).
    resolution: native square input side; must be a multiple of the teacher's patch size.
    summary: where the cls target comes from: "cls" (class token), "head" (attention-pooled
        head output, PE), "mean" (mean-pooled patches), "block:N" (block N's output, normed).
    patches: where patch targets come from: "final" or "block:N" (timm); an output/tensor name (onnx).
    mean / std: input normalization; empty means "from the model's pretrained config".
    weight: teacher weight in the total loss. patch_weight: gamma on the patch terms (Table 10).
    dtype: "auto" (bf16 on CUDA, fp32 on the CPU), "fp32" or "bf16" (bf16 weights and autocast).
    """

    backend: str = "timm"
    model: str = ""
    checkpoint: str | None = None
    pretrained: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)
    resolution: int | None = None
    summary: str = ""
    patches: str = "final"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    weight: float = 1.0
    patch_weight: float = 1.0
    dtype: str = "auto"
