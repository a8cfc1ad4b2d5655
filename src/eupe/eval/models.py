"""Load any model for evaluation: our zoo and `final/` folders, official EUPE `.pth`, timm models.

Every evaluation sees the same thing, an `EvalModel`: a frozen encoder that maps normalized images
to an `EncoderOutput`, plus the input mean/std and stride it expects, and where its adapter heads
live (for zero-shot). A bare zoo or timm name has random weights; `random_init` says so and every
results.json repeats it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models import ZOO, Encoder, EncoderOutput, create_model
from ..models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..runtime import pick_device


@dataclass
class EvalModel:
    """A frozen encoder ready for evaluation.

    encode: normalized images [B,3,H,W] (H, W multiples of `stride`) -> EncoderOutput.
    heads_dir: folder holding heads.safetensors / teacher_norm.safetensors, if any.
    """

    name: str
    module: nn.Module
    encode_fn: Callable[[torch.Tensor], EncoderOutput]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stride: int
    family: str
    heads_dir: Path | None
    random_init: bool
    device: torch.device

    @torch.no_grad()  # not inference_mode: probe heads train on these outputs
    def encode(self, images: torch.Tensor) -> EncoderOutput:
        return self.encode_fn(images.to(self.device, non_blocking=True))

    def normalize(self, images01: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=images01.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images01.device).view(1, 3, 1, 1)
        return (images01 - mean) / std

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "stride": self.stride,
            "random_init": self.random_init,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def _freeze(module: nn.Module, device: torch.device) -> nn.Module:
    module.eval().requires_grad_(False)
    return module.to(device)


def _from_encoder(name: str, model: Encoder, device: torch.device, heads_dir: Path | None, random_init: bool):
    model = _freeze(model, device)
    return EvalModel(
        name=name,
        module=model,
        encode_fn=model,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        stride=model.stride,
        family=model.family,
        heads_dir=heads_dir,
        random_init=random_init,
        device=device,
    )


def _heads_dir_near(path: str | os.PathLike) -> Path | None:
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    return folder if (folder / "heads.safetensors").is_file() else None


def _timm_model(name: str, weights: str | None, device: torch.device, **kwargs: Any) -> EvalModel:
    """A timm model through the timm teacher backend (its pretrained cfg gives mean/std).

    The cls feature is the class token where the model has one, else timm's pooled head output
    (PE-core, SigLIP). Weights come from `weights` only; without them the model is random.
    """
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ConfigError(
            f"unknown model '{name}': not a folder, not a zoo name ({', '.join(ZOO)}), "
            "not a timm model name (see timm.list_models('*pattern*'))"
        )
    from ..teachers.timm_teacher import TimmTeacher

    try:
        teacher = TimmTeacher(model=name, checkpoint=weights, pretrained=False, kwargs=kwargs, summary="cls")
    except ConfigError as e:
        if "no class token" not in str(e):
            raise
        teacher = TimmTeacher(model=name, checkpoint=weights, pretrained=False, kwargs=kwargs, summary="head")
    teacher = _freeze(teacher, device)
    return EvalModel(
        name=name,
        module=teacher,
        encode_fn=teacher.encode,
        mean=tuple(round(float(x), 6) for x in teacher.mean.flatten().tolist()),  # type: ignore[arg-type]
        std=tuple(round(float(x), 6) for x in teacher.std.flatten().tolist()),  # type: ignore[arg-type]
        stride=int(teacher.stride),
        family="vit" if teacher.is_vit else "cnn",
        heads_dir=None,
        random_init=weights is None,
        device=device,
    )


def load_model(
    model: str | os.PathLike | nn.Module | EvalModel,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    **timm_kwargs: Any,
) -> EvalModel:
    """Resolve `--model/--weights` (or a module from Python) into a frozen `EvalModel`.

    model: a `final/` or `save_pretrained` folder; a zoo name (+ weights: an official `.pth` or our
    file); a timm model name (+ weights); or an `Encoder`/`EvalModel` object.
    """
    dev = pick_device(device)
    if isinstance(model, EvalModel):
        return model
    if isinstance(model, Encoder):
        return _from_encoder(model.arch, model, dev, None, random_init=False)
    if isinstance(model, nn.Module):
        from ..teachers.base import Teacher

        if isinstance(model, Teacher):
            m = _freeze(model, dev)
            return EvalModel(
                name=type(model).__name__,
                module=m,
                encode_fn=model.encode,
                mean=tuple(round(float(x), 6) for x in model.mean.flatten().tolist()),  # type: ignore[arg-type]
                std=tuple(round(float(x), 6) for x in model.std.flatten().tolist()),  # type: ignore[arg-type]
                stride=int(model.stride),
                family="vit",
                heads_dir=None,
                random_init=False,
                device=dev,
            )
        raise ConfigError(f"cannot evaluate a {type(model).__name__}; pass an eupe Encoder or Teacher")
    name = str(model)
    if os.path.isdir(name):
        if weights is not None:
            raise ConfigError(f"{name}: a folder already holds its weights; drop --weights {weights}")
        enc = create_model(name)
        path = Path(name).resolve()
        label = (
            f"{path.parent.name}/{path.name}" if path.name == "final" else path.name
        )  # runs/s3/final -> s3/final
        return _from_encoder(label, enc, dev, _heads_dir_near(name), random_init=False)
    if name in ZOO:
        enc = create_model(name, weights=weights)
        heads = _heads_dir_near(weights) if weights is not None else None
        return _from_encoder(name, enc, dev, heads, random_init=weights is None)
    return _timm_model(name, None if weights is None else str(weights), dev, **timm_kwargs)
