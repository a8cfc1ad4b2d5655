"""Zero-shot classification through a teacher's text tower (IN1k-ZS, paper section 8.1).

The classifier weights are the text tower's normalized, template-averaged embeddings of the class
names. The student's cls token goes through its trained adapter head for that teacher (from
`final/heads.safetensors`), is mapped back from the teacher-normalized space with the stored
TeacherNorm statistics when present, L2-normalized, and scored by softmax over dot products.
A model without such a head gets value None and status "not supported: ...".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import ConfigError
from .common import EvalResult, not_supported, resolve_settings, settings_dict
from .datasets import ClassFolder
from .knn import classification_transform, extract_cls
from .models import EvalModel, load_model


@dataclass
class ZeroShotSettings:
    teacher: str = ""  # adapter-head name; "" = the only one in heads.safetensors; "none" = raw cls;
    # "proxy>pe_core_g" = this model's proxy head, then the proxy's pe_core_g head (see chain_dirs)
    chain_dirs: list[str] = field(default_factory=list)  # heads folders for the hops after the first
    text_model: str = ""  # open_clip model name (e.g. PE-Core-bigG-14-448) or a model-config .json file
    text_weights: str = ""  # local open_clip checkpoint for text_model ("" = random, tests only)
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    classnames: str = ""  # file: one name per line (sorted-folder order) or JSON {folder: name}
    logit_scale: float = 100.0
    resolution: int = 224
    resize: int = 0
    batch_size: int = 64
    num_workers: int = 4
    val_split: str = "val"
    device: str = "auto"


def read_classnames(folders: list[str], path: str) -> list[str]:
    """Human class names for `folders` (e.g. ImageNet wnids); default: folder names, '_' -> ' '."""
    if not path:
        return [f.replace("_", " ") for f in folders]
    text = Path(path).read_text()
    if path.endswith(".json"):
        mapping = json.loads(text)
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise ConfigError(f"{path}: no name for class folder(s) {', '.join(missing[:5])}")
        return [mapping[f] if isinstance(mapping[f], str) else mapping[f][0] for f in folders]
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != len(folders):
        raise ConfigError(f"{path}: {len(names)} class names for {len(folders)} class folders")
    return names


def open_clip_text_tower(name: str, weights: str = "", device: str | torch.device = "cpu"):
    """(model, tokenizer) of an open_clip model by name, weights from a local file only."""
    try:
        import open_clip
    except ImportError:
        raise ConfigError("zero-shot needs open_clip: pip install 'eupe[eval]'") from None
    if name.endswith(".json") and Path(name).is_file():  # a model config of one's own
        open_clip.add_model_config(name)
        name = Path(name).stem
    if name not in open_clip.list_models():
        raise ConfigError(
            f"text_model '{name}' is not an open_clip model (see open_clip.list_models()) nor a config .json"
        )
    if weights and not Path(weights).is_file():
        raise ConfigError(f"text_weights {weights}: no such file (text towers load from local files only)")
    model = open_clip.create_model(name, pretrained=weights or None, device=device)
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(name)


@torch.no_grad()
def text_classifier(model: Any, tokenizer: Any, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """[C, E] unit vectors: the mean of each class's normalized template embeddings, renormalized."""
    device = next(model.parameters()).device
    rows = []
    for name in tqdm(classnames, desc="zero-shot text weights", unit="class", leave=False):
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=0))
    return torch.stack(rows)


def zero_shot_logits(image_emb: torch.Tensor, classifier: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * F.normalize(image_emb.float(), dim=-1) @ classifier.T


def _one_hop(heads_dir: Path, teacher: str, device: torch.device):
    """cls -> `teacher`'s raw cls space through the heads in `heads_dir`, or a reason string."""
    from ..distill.heads import TeacherHeads

    heads = TeacherHeads.load(heads_dir).to(device).eval()
    names = list(heads.teacher_dims)
    if not teacher:
        if len(names) != 1:
            raise ConfigError(
                f"{heads_dir}: several adapter heads ({', '.join(names)}); pick one with teacher=NAME"
            )
        teacher = names[0]
    if teacher not in names:
        return f"no adapter head for teacher '{teacher}' in {heads_dir} (heads: {', '.join(names)})"
    norm = None
    if (heads_dir / "teacher_norm.safetensors").is_file():
        from ..distill.norm import TeacherNorm

        norm = TeacherNorm.load(heads_dir).to(device)
        if teacher not in norm.teachers:
            norm = None
    head = heads.cls[teacher]

    def project(x: torch.Tensor) -> torch.Tensor:
        y = head(x)
        if norm is not None:  # back from the normalized targets to the teacher's own space
            y = y * norm._buf(teacher, "cls_std") + norm._buf(teacher, "cls_mean")
        return y

    return project


def _projector(m: EvalModel, teacher: str, chain_dirs: list[str]):
    """cls -> the text-aligned teacher's space, or a reason string when this model cannot get there.

    `teacher` may chain hops, "proxy>pe_core_g": this model's "proxy" head, then the "pe_core_g"
    head saved with the proxy (its final/ folder, given in `chain_dirs`), as for a Stage-2/3
    student whose only teacher is the Stage-1 proxy.
    """
    if teacher == "none":
        return lambda x: x
    if m.heads_dir is None:
        return "no adapter heads (heads.safetensors) next to the model; zero-shot needs the head of a text-aligned teacher"
    hops = teacher.split(">") if teacher else [""]
    if len(chain_dirs) != len(hops) - 1:
        raise ConfigError(
            f"teacher={teacher!r} has {len(hops) - 1} hop(s) after the model's own head; give as many "
            f"heads folders in chain_dirs (got {len(chain_dirs)}), e.g. chain_dirs=[runs/stage1/final]"
        )
    steps = []
    for heads_dir, hop in zip([m.heads_dir, *map(Path, chain_dirs)], hops):
        step = _one_hop(Path(heads_dir), hop.strip(), m.device)
        if isinstance(step, str):
            return step
        steps.append(step)

    def project(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return project


def _to_text_space(emb: torch.Tensor, text_model: Any, text_dim: int) -> tuple[torch.Tensor, bool]:
    """Apply the CLIP model's own visual projection when the head targets pre-projection features.

    A teacher whose cls target is its pooled output before the projection (timm `pre_logits`)
    gives heads of the pooled width; the open_clip model's `visual.proj` [width, text_dim] then
    maps them into the text space.
    """
    if emb.shape[-1] == text_dim:
        return emb, False
    proj = getattr(getattr(text_model, "visual", None), "proj", None)
    if isinstance(proj, torch.Tensor) and tuple(proj.shape) == (emb.shape[-1], text_dim):
        return emb @ proj.to(emb.device, emb.dtype), True
    return emb, False


def zeroshot(
    model: Any,
    data: str | os.PathLike,
    weights: str | None = None,
    output_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> EvalResult:
    """Zero-shot top-1 accuracy on `data/<val_split>/<class>/*` (or `data/<class>/*`)."""
    s = resolve_settings(ZeroShotSettings, overrides)
    m = load_model(model, weights, s.device)
    root = Path(data) / s.val_split if (Path(data) / s.val_split).is_dir() else Path(data)
    project = _projector(m, s.teacher, s.chain_dirs)
    if isinstance(project, str):
        result = not_supported("zeroshot", "top1", m.name, str(data), s, project)
        result.extra["model_info"] = m.describe()
    else:
        if not s.text_model:
            raise ConfigError("zero-shot needs a text tower: text_model=NAME text_weights=FILE (open_clip)")
        val = ClassFolder(root)
        text, tokenizer = open_clip_text_tower(s.text_model, s.text_weights, m.device)
        classifier = text_classifier(text, tokenizer, read_classnames(val.classes, s.classnames), s.templates)
        tf = classification_transform(m, s.resolution, s.resize)
        feats, labels = extract_cls(m, val, tf, s.batch_size, s.num_workers, "zero-shot image features")
        with torch.no_grad():
            emb = project(feats)
        emb, used_proj = _to_text_space(emb, text, classifier.shape[-1])
        if emb.shape[-1] != classifier.shape[-1]:
            raise ConfigError(
                f"the projected cls has {emb.shape[-1]} dims but text tower '{s.text_model}' embeds "
                f"{classifier.shape[-1]}; pick the teacher whose text tower this is"
            )
        probs = zero_shot_logits(emb, classifier, s.logit_scale).softmax(-1)
        top5 = probs.topk(min(5, probs.shape[1]), dim=1).indices
        top1 = float((top5[:, 0] == labels).float().mean())
        result = EvalResult(
            task="zeroshot",
            metric="top1",
            value=top1,
            model=m.name,
            dataset=str(data),
            settings=settings_dict(s),
            extra={
                "top5": float((top5 == labels[:, None]).any(1).float().mean()),
                "num_val": len(val),
                "num_classes": len(val.classes),
                "visual_projection": used_proj,
                "model_info": m.describe(),
            },
        )
    if output_dir is not None:
        result.write(output_dir)
    return result
