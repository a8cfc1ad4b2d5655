"""The demo's precomputed-target distillation: teachers run once, every stage trains from memory.

On a 2-core CPU the experts cost ~25 ms (EfficientNet-Lite0 @160) and ~15 ms (PP-OCRv4 det @192)
per image, as much as a ViT-T training step on that image. So the demo fixes K augmented views
per pool image (`make_views`), runs each teacher over them exactly once (`teacher_targets`,
normalized with `TeacherNorm` measured on all views), and trains every stage from those tensors
(`train_student`), using the library's heads (`TeacherHeads`), loss (`teacher_loss`, paper 3.2),
AdamW groups and warmup + cosine schedule. Stage 2/3's teacher (the proxy) is a frozen network
too, so its targets are precomputed the same way once Stage 1 is done.

This is a demo-local precompute, not `eupe distill`: the general teacher-feature cache
(`eupe cache-teacher`, `data.teacher_cache`) was being built at the same time; see docs/demo.md.
Everything runs on the calling thread in a fixed order from one seed, so a re-run is bit-identical
(with `torch.set_num_threads(1)`, set by the pipeline).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..distill.loss import teacher_loss, total_loss
from ..distill.optim import CosineSchedule, build_optimizer
from ..models.encoder import EncoderOutput
from ..models.heads import TeacherHeads
from ..models.teacher_norm import TeacherNorm
from .bench import IMAGENET_MEAN, IMAGENET_STD, encoder_featurizer
from .data import random_crop

ViewModel = Callable[[torch.Tensor], EncoderOutput]  # views in [0,1] -> raw outputs


@dataclass
class Targets:
    """One teacher's normalized targets for every view: cls [V, Dc] and patches [V, N, Dp]."""

    cls: torch.Tensor
    patches: torch.Tensor  # float16 (unit-variance after TeacherNorm), halves the memory
    grid: tuple[int, int]

    @property
    def dims(self) -> tuple[int, int]:
        return self.cls.shape[1], self.patches.shape[2]

    def batch(self, views: torch.Tensor, idx: torch.Tensor, resolution: int) -> EncoderOutput:
        return EncoderOutput(self.cls[idx], self.patches[idx].float(), None, self.grid)


@dataclass
class OnlineTeacher:
    """A frozen eupe encoder run inside the loop, at its own scale drawn per step (Stage 3).

    Paper 3.3: "the student and the teacher randomly select one scale from the pyramid
    independently". Its outputs are standardized with the `TeacherNorm` measured for Stage 2, so
    the Stage-2 adapter heads keep their meaning.
    """

    encoder: torch.nn.Module
    norm: TeacherNorm
    name: str
    resolutions: tuple[int, ...]

    @property
    def dims(self) -> tuple[int, int]:
        return self.norm.dims(self.name)

    def batch(self, views: torch.Tensor, idx: torch.Tensor, resolution: int) -> EncoderOutput:
        # the same featurizer as the precomputed Stage-2 proxy targets, at this step's side
        raw = encoder_featurizer(self.encoder, resolution)(views[idx].float().div_(255))
        with torch.no_grad():  # clone: inference tensors cannot be loss targets
            return self.norm.normalize(
                self.name, EncoderOutput(raw.cls.clone(), raw.patches.clone(), None, tuple(raw.grid))
            )


def make_views(pool: np.ndarray, k: int, size: int, seed: int, progress: bool = True) -> torch.Tensor:
    """K random-resized-crop + flip views of every pool image: uint8 [N*K, 3, size, size].

    View j of image i depends only on (seed, i, j), so a smaller pool's views are a prefix.
    """
    out = torch.empty((len(pool) * k, 3, size, size), dtype=torch.uint8)
    for i in tqdm(range(len(pool)), desc="demo views", disable=not progress, leave=False):
        img = Image.fromarray(pool[i])
        for j in range(k):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 7, i, j]))
            crop = np.asarray(random_crop(img, size, rng, min_area=0.35))
            out[i * k + j] = torch.from_numpy(crop.copy()).permute(2, 0, 1)
    return out


def _batches(n: int, batch: int) -> list[slice]:
    return [slice(i, min(n, i + batch)) for i in range(0, n, batch)]


def teacher_targets(
    models: dict[str, ViewModel], views: torch.Tensor, batch: int = 32, desc: str = "teacher targets"
) -> tuple[dict[str, Targets], TeacherNorm]:
    """Run each frozen model once over all views; standardize with a TeacherNorm of all views."""
    raw: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], tuple[int, int]]] = {}
    slices = _batches(len(views), batch)
    bar = tqdm(total=len(slices) * len(models), desc=desc)
    for name, model in models.items():
        cls, patches, grid = [], [], (0, 0)
        for sl in slices:
            with torch.inference_mode():
                out = model(views[sl].float().div_(255))
            cls.append(out.cls.float().clone())  # clone: normal tensors, usable as loss targets
            patches.append(out.patches.float().clone())
            grid = tuple(out.grid)
            bar.update(1)
        raw[name] = (cls, patches, grid)
    bar.close()
    norm = TeacherNorm({n: (c[0].shape[-1], p[0].shape[-1]) for n, (c, p, _) in raw.items()})
    for name, (cls, patches, grid) in raw.items():
        for c, p in zip(cls, patches):
            norm.observe(name, EncoderOutput(c, p, None, grid))
    norm.freeze()
    targets = {}
    for name, (cls, patches, grid) in raw.items():
        y = norm.normalize(name, EncoderOutput(torch.cat(cls), torch.cat(patches), None, grid))
        targets[name] = Targets(y.cls, y.patches.half(), grid)
    return targets, norm


def student_input(views: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 views -> ImageNet-normalized float images at `resolution` (what an eupe Encoder takes)."""
    x = views.float().div_(255)
    if x.shape[-1] != resolution:
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - mean) / std


@dataclass
class StageSettings:
    """The optimization numbers of one stage."""

    steps: int
    batch: int
    lr: float
    warmup: int
    resolutions: tuple[int, ...]  # one: a fixed stage; several: a pyramid draw per step
    head_dim: int = 256
    weight_decay: float = 0.05
    min_lr_ratio: float = 0.05
    clip_grad: float = 1.0


def train_student(
    student: torch.nn.Module,
    views: torch.Tensor,
    targets: dict[str, Targets | OnlineTeacher],
    s: StageSettings,
    seed: int,
    out_dir: Path,
    desc: str,
    heads: TeacherHeads | None = None,
    position: int = 0,
) -> tuple[torch.nn.Module, TeacherHeads]:
    """Distill `targets` into `student` (in place) and save it to out_dir/final; logs metrics.jsonl.

    `heads` continues earlier adapter heads (Stage 3 after Stage 2: same proxy teacher). An
    `OnlineTeacher` draws its own input side from its pyramid each step, after the student's draw.
    """
    torch.manual_seed(seed)
    dims = {n: t.dims for n, t in targets.items()}
    if heads is None:
        heads = TeacherHeads(student.embed_dim, dims, s.head_dim)
    student.train()
    heads.train()
    opt = build_optimizer([("student", student), ("heads", heads)], s.lr, s.weight_decay, (0.9, 0.999))
    sched = CosineSchedule(opt, s.lr, s.steps, min(s.warmup, s.steps), min_lr=s.lr * s.min_lr_ratio)
    params = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(views), generator=gen)
    pos = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    log = (out_dir / "metrics.jsonl").open("w")
    bar = tqdm(range(s.steps), desc=desc, position=position, leave=position == 0)
    for step in bar:
        if pos + s.batch > len(order):
            order, pos = torch.randperm(len(views), generator=gen), 0
        idx = order[pos : pos + s.batch]
        pos += s.batch
        res = s.resolutions[int(torch.randint(len(s.resolutions), (1,), generator=gen))]
        out = student(student_input(views[idx], res))
        per, teacher_res = {}, {}
        for name, t in targets.items():
            sides = getattr(t, "resolutions", (0,))  # precomputed targets: no draw
            teacher_res[name] = sides[int(torch.randint(len(sides), (1,), generator=gen))]
            y = t.batch(views, idx, teacher_res[name])
            z_cls, z_patch = heads(out, [name])[name]
            per[name] = teacher_loss(z_cls, z_patch, tuple(out.grid), y.cls, y.patches, tuple(y.grid))
        loss, logged = total_loss(per)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.clip_grad)
        opt.step()
        sched.step()
        row = {"step": step + 1, "loss": float(loss.detach()), "lr": sched.current_lr, "resolution": res}
        row.update({f"teacher_resolution/{n}": r for n, r in teacher_res.items() if r})
        row.update({k: float(v) for k, v in logged.items()}, grad_norm=float(grad_norm))
        log.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    log.close()
    student.eval()
    heads.eval()
    final = out_dir / "final"
    student.save_pretrained(final)
    heads.save(final)
    return student, heads


@torch.no_grad()
def heldout_cosine(
    out: EncoderOutput, heads: TeacherHeads, target: EncoderOutput, name: str
) -> dict[str, float]:
    """How well a student's adapter head for teacher `name` predicts its normalized `target`.

    `out` is the student's output on the same images. Mean cosine similarity, cls and patches (the
    training loss's terms as similarities). On training views vs held-out images it separates "not
    fitted yet" (both low) from "fitted the pool but does not generalize" (train high, held-out low).
    """
    z_cls, z_patch = heads(out, [name])[name]
    terms = teacher_loss(z_cls, z_patch, tuple(out.grid), target.cls, target.patches, tuple(target.grid))
    return {"cls_cos_sim": 1.0 - float(terms["cls_cos"]), "patch_cos_sim": 1.0 - float(terms["patch_cos"])}
