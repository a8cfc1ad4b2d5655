"""Zero-shot classification through a teacher's text tower (IN1k-ZS, paper section 8.1).

The classifier weights are the text tower's normalized, template-averaged embeddings of the class
names (default templates: the 80 OpenAI ImageNet prompts, see `templates.py`). The student's cls
token goes through its trained adapter head for that teacher (from `final/heads.safetensors`), is
mapped back from the teacher-normalized space with the stored TeacherNorm statistics when
present, into the text space (below), L2-normalized, and scored by softmax over dot products.
A model without such a head gets value None and status "not supported: ...".

Which PE-core output is "the teacher's space". The paper (8.1): "we use the teacher's text tower
to build the classifier weights and project the class token into the teacher's space using the
adapter head", then takes dot products with the classifier weights. Dot products with text
embeddings need the image side in the text space, so the class token the paper distils from
PEcore is the image embedding PE-core itself outputs: Meta's PE `VisionTransformer.forward`
(facebookresearch/perception_models, core/vision_encoder/pe.py) attention-pools and then applies
`x @ self.proj` (1536 -> 1280 for PE-core-G). In timm and open_clip that projection is the trunk's
`head` (open_clip builds PE-core's image tower as a timm trunk whose classifier is the projection;
there is no `visual.proj`). So the paper implies distilling the projected output: teacher
`summary: proj` (1280-d), whose head lands in the text space directly; our `pe_core_g` preset does
that. A head distilled before the projection (`summary: head`, 1536-d, e.g. a run made before the
preset changed) still works: this module then applies the text tower's own visual projection (`visual.proj` for open_clip ViTs, else the
timm trunk's `head` followed by open_clip's `visual.head`) after TeacherNorm is undone, which
gives exactly PE-core's image embedding for the teacher's own features (`visual_projection=auto`
does this when the widths differ; `yes` forces it, e.g. for PE-core-L where both widths are 1024;
`no` never projects).
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
from .registry import register_task
from .templates import resolve_templates


@dataclass
class ZeroShotSettings:
    teacher: str = ""  # adapter-head name; "" = the only one in heads.safetensors; "none" = raw cls;
    # "proxy>pe_core_g" = this model's proxy head, then the proxy's pe_core_g head (see chain_dirs)
    chain_dirs: list[str] = field(default_factory=list)  # heads folders for the hops after the first
    text_model: str = ""  # open_clip model name (e.g. PE-Core-bigG-14-448) or a model-config .json file
    text_weights: str = ""  # local open_clip checkpoint for text_model ("" = random, tests only)
    # openai_imagenet (the 80 CLIP ImageNet prompts) | simple ("a photo of a {}.") | a text file
    # with one template per line | (Python API) a list of templates
    templates: Any = "openai_imagenet"
    visual_projection: str = "auto"  # auto | yes | no: the text tower's image projection after the head
    classnames: str = ""  # file: one name per line (sorted-folder order) or JSON {folder: name}
    logit_scale: float = 100.0
    resolution: int = 224
    resize: int = 0
    batch_size: int = 64
    num_workers: int = 4
    val_split: str = "val"
    device: str = "auto"

    def check(self) -> None:
        if self.visual_projection not in ("auto", "yes", "no"):
            raise ConfigError(f"visual_projection={self.visual_projection!r}: choose from auto, yes, no")
        if not isinstance(self.templates, (str, list, tuple)):
            raise ConfigError("templates must be openai_imagenet, simple, a file path or a list of templates")


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
    from ..models.heads import TeacherHeads

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
        from ..models.teacher_norm import TeacherNorm

        norm = TeacherNorm.load(heads_dir).to(device)
        if teacher not in norm.teachers:
            norm = None
    head = heads.cls[teacher]

    def project(x: torch.Tensor) -> torch.Tensor:
        y = head(x)
        if norm is not None:  # back from the normalized targets to the teacher's own space
            y = norm.denormalize(teacher, y, "cls")
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


def visual_projection(text_model: Any, width: int) -> Any:
    """The CLIP model's map from its pooled image features (`width` wide) to the text space, or None.

    open_clip ViTs keep it as `visual.proj` [width, embed]. open_clip towers built on a timm trunk
    (PE-core, SigLIP, ...) have none: there the trunk's classifier (`trunk.head`, the projection,
    e.g. PE-core-G's 1536 -> 1280) is applied after timm's `pre_logits`, then open_clip's own
    `visual.head` (empty for PE-core; a linear/MLP projection for towers that add one).
    """
    visual = getattr(text_model, "visual", None)
    proj = getattr(visual, "proj", None)
    if isinstance(proj, torch.Tensor):
        return (lambda x: x @ proj.to(x.device, x.dtype)) if proj.shape[0] == width else None
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        return None
    classifier = trunk.get_classifier() if hasattr(trunk, "get_classifier") else getattr(trunk, "head", None)
    after = getattr(visual, "head", None)
    steps = [m for m in (classifier, after) if isinstance(m, torch.nn.Module)]
    if not steps:
        return None

    def project(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    device, dtype = _device_dtype(text_model, torch.zeros(()))
    try:  # the right input width? (a Linear of another width raises)
        with torch.no_grad():
            project(torch.zeros(1, width, device=device, dtype=dtype))
    except (RuntimeError, ValueError):
        return None
    return project


def _device_dtype(model: Any, like: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    try:
        p = next(model.parameters())
        return p.device, p.dtype
    except (AttributeError, StopIteration):
        return like.device, like.dtype


def to_text_space(
    emb: torch.Tensor, text_model: Any, text_dim: int, mode: str = "auto"
) -> tuple[torch.Tensor, bool]:
    """Apply the CLIP model's own visual projection to heads that target pre-projection features.

    mode "auto": only when the head's width differs from the text width (PE-core-G with the
    `pe_core_g` preset: 1536 vs 1280); "yes": always (PE-core-L: 1024 and 1024); "no": never.
    """
    if mode == "no" or (mode == "auto" and emb.shape[-1] == text_dim):
        return emb, False
    project = visual_projection(text_model, emb.shape[-1])
    out = None
    if project is not None:
        device, dtype = _device_dtype(text_model, emb)
        with torch.no_grad():
            out = project(emb.to(device, dtype)).to(emb.device, emb.dtype)
    if out is None or out.shape[-1] != text_dim:
        if mode == "yes":
            raise ConfigError(
                f"visual_projection=yes, but the text tower has no image projection from "
                f"{emb.shape[-1]}-d features to its {text_dim}-d text space (no visual.proj, no timm "
                "trunk head of that width)"
            )
        return emb, False
    return out, True


@register_task(
    "zeroshot",
    settings=ZeroShotSettings,
    label="IN1k-ZS",
    help="zero-shot top-1 through a teacher's text tower and the student's adapter head (IN1k-ZS)",
    example="teacher=pe_core text_model=PE-Core-B-16 text_weights=pe_core_b16.bin classnames=names.txt",
)
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
        templates = resolve_templates(s.templates)
        classifier = text_classifier(text, tokenizer, read_classnames(val.classes, s.classnames), templates)
        tf = classification_transform(m, s.resolution, s.resize)
        feats, labels = extract_cls(m, val, tf, s.batch_size, s.num_workers, "zero-shot image features")
        with torch.no_grad():
            emb = project(feats)
        emb, used_proj = to_text_space(emb, text, classifier.shape[-1], s.visual_projection)
        if emb.shape[-1] != classifier.shape[-1]:
            raise ConfigError(
                f"the projected cls has {emb.shape[-1]} dims but text tower '{s.text_model}' embeds "
                f"{classifier.shape[-1]} and has no image projection from {emb.shape[-1]}; "
                "pick the teacher whose text tower this is"
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
                "num_templates": len(templates),
                "visual_projection": used_proj,
                "model_info": m.describe(),
            },
        )
    if output_dir is not None:
        result.write(output_dir)
    return result
