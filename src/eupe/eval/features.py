"""Training a linear probe on a frozen backbone, with an optional frozen-feature cache.

A probe's 40k iterations would otherwise run the backbone 640k times. Since the backbone is frozen,
its patch features depend only on the (augmented) input, so `cache_views=V` computes features for
V fixed augmented views of every training image once (V = 1: one pass, "once per epoch") and
trains the head on batches drawn from that cache. The cost: fewer distinct augmentations, which
`cache_refresh=R` softens by rebuilding the cache from fresh augmentations every R steps (R = the
steps of one pass over the cache: "a new cache per epoch").
`cache_views=0` recomputes the backbone on fresh augmentations every step (the paper's protocol).

The optimizer is AdamW under `WarmupOneCycle`, the learning-rate (and optionally Adam beta1) curve of
the released EUPE/DINOv3 probe configs, written as a pure function of the step.

`backbone_mode=release` reproduces what Meta's probe loops do to the frozen backbone: they leave it
in train mode (`ModelWithIntermediateLayers` calls `feature_model.train()`) until their first
validation switches the whole model to eval, so a DINOv3-style ViT trains the head on features with
its RoPE coordinate rescale on. `ProbeSchedule.backbone_train_steps` says for how many iterations;
those always run the backbone live, on fresh views, whatever the cache settings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import ConfigError
from ..models.rope import rope_augment
from ..runtime import seed_everything
from .common import EvalResult, resolve_settings, settings_dict
from .models import EvalModel, load_model

# one augmented training view: (image [3,S,S] float in [0,1], target [S,S])
ViewFn = Callable[[int, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]
S = TypeVar("S")
BACKBONE_MODES = ("eval", "release")
# Meta's hub ViTs: `pos_embed_rope_rescale_coords=2`, no shift or jitter (eupe/hub/backbones.py)
RELEASE_ROPE_RESCALE = 2.0


@dataclass(frozen=True)
class WarmupOneCycle:
    """The release's `WarmupOneCycleLR` (eupe/eval/{segmentation,depth}/schedulers.py) as step -> values.

    Warmup (step < `warmup`): with `warmup_ratio` > 0, lr * (1 - (1 - s/W)(1 - ratio)) * (1 - s/T)
    (seg); else lr / final_div_factor + lr * (1 + cos(pi s/T)) / 2 * s/W (depth). After it, cosine
    from lr down to lr / div_factor / final_div_factor at (s + 1)/T. With `momentum=(base, max)`,
    Adam's beta1 is 0 during warmup (the release sets no momentum there), then rises from base to
    max on a cosine. `step_offset=1` repeats the first value once: the release's seg loop skips
    `scheduler.step()` after its first iteration.
    """

    lr: float
    total: int
    warmup: int
    warmup_ratio: float = 0.0
    div_factor: float = 25.0
    final_div_factor: float = 1000.0
    momentum: tuple[float, float] | None = None
    step_offset: int = 0

    def __call__(self, step: int) -> tuple[float, float | None]:
        """(learning rate, beta1 or None to leave it) for optimizer step `step` (0-based)."""
        s, total, warm = max(0, step - self.step_offset), max(1, self.total), self.warmup
        min_lr = self.lr / self.div_factor / self.final_div_factor  # 0 for final_div_factor=inf
        if s < warm:
            if self.warmup_ratio:
                k = (1 - s / warm) * (1 - self.warmup_ratio)
                lr = self.lr * (1 - k) * (1 - s / total)
            else:
                peak = self.lr * (1 + math.cos(math.pi * s / total)) / 2
                lr = self.lr / self.final_div_factor + peak * s / warm
            return lr, (0.0 if self.momentum else None)
        lr = min_lr + (self.lr - min_lr) / 2 * (1 + math.cos(math.pi * min(1.0, (s + 1) / total)))
        if self.momentum is None:
            return lr, None
        base, top = self.momentum
        pct = min(1.0, (s - warm) / max(1, total - warm))
        return lr, top + (base - top) / 2 * (1 + math.cos(math.pi * pct))


@dataclass
class ProbeSchedule:
    iterations: int
    batch_size: int
    schedule: WarmupOneCycle
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0  # max global grad norm of the head; 0: no clipping
    cache_views: int = 0
    seed: int = 0
    num_workers: int = 0
    cache_refresh: int = 0  # rebuild the cache with fresh augmentations every this many steps (0: never)
    backbone_train_steps: int = 0  # the first this many steps run the backbone in train mode, live

    @classmethod
    def from_settings(cls, s: Any, schedule: WarmupOneCycle, backbone_train_steps: int = 0) -> ProbeSchedule:
        """The schedule of a probe task's settings (seg and depth share these field names)."""
        names = ("iterations", "batch_size", "weight_decay", "betas", "grad_clip", "cache_views", "seed")
        return cls(
            schedule=schedule,
            num_workers=s.num_workers,
            cache_refresh=s.cache_refresh,
            backbone_train_steps=backbone_train_steps if s.backbone_mode == "release" else 0,
            **{n: getattr(s, n) for n in names},
        )


def release_share(value: int, iterations: int, share: float) -> int:
    """A step count setting: `value`, or with -1 the release's `share` of a run of `iterations`
    (so short runs keep the release's proportions)."""
    return round(iterations * share) if value < 0 else value


def check_backbone_mode(mode: str) -> None:
    if mode not in BACKBONE_MODES:
        raise ConfigError(f"backbone_mode={mode!r}: choose from {', '.join(BACKBONE_MODES)}")


@contextmanager
def backbone_train_mode(model: EvalModel) -> Iterator[None]:
    """The frozen backbone in train mode as Meta's probes run it; eval mode again on exit.

    Gradients stay off (`EvalModel.encode`). For DINOv3-style ViTs that means Meta's RoPE coordinate
    rescale, log-uniform in [1/2, 2] and drawn per block as Meta's ViT draws it, whatever the
    model's own settings: the release probes Meta's hub models, which all carry it. Dropout or
    drop-path, where a model has them, are on too, as in the release.
    """
    with rope_augment(model.module, rescale=RELEASE_ROPE_RESCALE):
        model.module.train()
        try:
            yield
        finally:
            model.module.eval()


def start_probe(cls: type[S], model: Any, weights: str | None, overrides: dict) -> tuple[S, EvalModel, int]:
    """A probe task's settings, its frozen model and the model's patch-feature width; seeded."""
    s: Any = resolve_settings(cls, overrides)
    m = load_model(model, weights, s.device)
    seed_everything(s.seed)
    return s, m, patch_features(m, torch.zeros(1, 3, m.stride, m.stride)).shape[1]


def finish_probe(
    task: str, metric: str, value: float, m: EvalModel, data: Any, s: Any, extra: dict, output_dir: Any
) -> EvalResult:
    """The probe's `EvalResult` (settings, the model's description), written to `output_dir` if given."""
    result = EvalResult(
        task=task,
        metric=metric,
        value=value,
        model=m.name,
        dataset=str(data),
        settings=settings_dict(s),
        extra={**extra, "model_info": m.describe()},
    )
    if output_dir is not None:
        result.write(output_dir)
    return result


def patch_features(model: EvalModel, images01: torch.Tensor) -> torch.Tensor:
    """Frozen patch tokens (after the final norm) as a [B, D, h, w] map.

    Sides that are not multiples of the stride are zero-padded (after normalization) on both sides
    to the next multiple, as the release's depth probe does (`CenterPadding`); the map then covers
    the padded image.
    """
    x = model.normalize(images01.to(model.device))
    ph, pw = (-x.shape[-2]) % model.stride, (-x.shape[-1]) % model.stride
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return model.encode(x).patch_map().float()


class _Views(torch.utils.data.Dataset):
    """Item k is a view of image `images[k]` drawn with its own seeded generator (worker-proof)."""

    def __init__(self, view_fn: ViewFn, images: np.ndarray, seed: int):
        self.view_fn, self.images, self.seed = view_fn, images, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view_fn(int(self.images[k]), np.random.default_rng([self.seed, k]))


def _loader(views: _Views, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        views,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


class FeatureCache:
    """Patch features (float16, CPU) and targets of `views` fixed augmented views per training image.

    Memory: views x images x D x h x w x 2 bytes (ADE20k, ViT-B at 512 px: 31 GB per view), so the
    cache suits small probes and quick iterations; the paper numbers use cache_views=0.
    """

    def __init__(
        self,
        model: EvalModel,
        view_fn: ViewFn,
        num_images: int,
        views: int,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
    ):
        order = np.tile(np.arange(num_images), views)
        loader = _loader(_Views(view_fn, order, seed + 1), batch_size, num_workers)
        start = time.perf_counter()
        feats, targets = [], []
        for imgs, tgts in tqdm(loader, desc="caching probe features", unit="batch", leave=False):
            feats.append(patch_features(model, imgs).half().cpu())
            targets.append(tgts)
        self.feats, self.targets = torch.cat(feats), torch.cat(targets)
        self.seconds = time.perf_counter() - start

    def __len__(self) -> int:
        return len(self.feats)

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.feats[idx].to(device).float(), self.targets[idx].to(device)


def train_probe(
    model: EvalModel,
    head: nn.Module,
    view_fn: ViewFn,
    num_images: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sched: ProbeSchedule,
    desc: str,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train `head` (feature map -> predictions) with AdamW; returns timing and the last loss.

    `after_step(n)` runs after the n-th optimizer step (seg's validations), with the backbone already
    back in eval mode from step `sched.backbone_train_steps` on, as after Meta's first validation.
    """
    head.to(model.device).train()
    lr0, _ = sched.schedule(0)
    opt = torch.optim.AdamW(
        head.parameters(), lr=lr0, betas=tuple(sched.betas), weight_decay=sched.weight_decay
    )
    gen = torch.Generator().manual_seed(sched.seed)
    cache = batches = None
    cache_seconds, cache_builds, after_seconds = 0.0, 0, 0.0
    train_steps = min(sched.backbone_train_steps, sched.iterations)

    def build_cache(seed: int) -> FeatureCache:
        nonlocal cache_seconds, cache_builds
        c = FeatureCache(
            model, view_fn, num_images, sched.cache_views, sched.batch_size, seed, sched.num_workers
        )
        cache_seconds += c.seconds
        cache_builds += 1
        return c

    if sched.cache_views > 0:
        cache = build_cache(sched.seed)
    first_build_seconds = cache_seconds
    live_steps = sched.iterations if cache is None else train_steps
    if live_steps:
        # the whole sampling order up front: item k of the run is image order[k], view seed k
        order = torch.randint(num_images, (live_steps * sched.batch_size,), generator=gen).numpy()
        batches = iter(_loader(_Views(view_fn, order, sched.seed), sched.batch_size, sched.num_workers))
    start = time.perf_counter()
    loss_value = float("nan")
    bar = tqdm(range(sched.iterations), desc=desc, unit="it", leave=False)
    with ExitStack() as backbone:
        backbone.enter_context(backbone_train_mode(model) if train_steps else nullcontext())
        for step in bar:
            lr, beta1 = sched.schedule(step)
            for g in opt.param_groups:
                g["lr"] = lr
                if beta1 is not None:
                    g["betas"] = (beta1, g["betas"][1])
            if cache is not None and step >= train_steps:
                if sched.cache_refresh > 0 and step > 0 and step % sched.cache_refresh == 0:
                    cache = None  # free the old features before computing the new ones
                    cache = build_cache(sched.seed + step)
                idx = torch.randint(len(cache), (sched.batch_size,), generator=gen)
                feats, targets = cache.batch(idx, model.device)
            else:
                imgs, targets = next(batches)
                feats = patch_features(model, imgs)
                targets = targets.to(model.device, non_blocking=True)
            loss = loss_fn(head(feats), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sched.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(head.parameters(), sched.grad_clip)
            opt.step()
            if step % 10 == 0 or step == sched.iterations - 1:
                loss_value = float(loss.detach())
                bar.set_postfix(loss=f"{loss_value:.4f}")
            if step + 1 == train_steps:
                backbone.close()  # eval mode from here on, as after the release's first validation
            if after_step is not None:
                t = time.perf_counter()
                after_step(step + 1)
                after_seconds += time.perf_counter() - t
    head.eval()
    # the first cache build ran before `start`; refreshes ran inside the loop and count as cache time
    loop_seconds = time.perf_counter() - start - (cache_seconds - first_build_seconds) - after_seconds
    return {
        "train_seconds": loop_seconds + cache_seconds,
        "validation_seconds": after_seconds,
        "cache_seconds": cache_seconds,
        "cache_builds": cache_builds,
        "seconds_per_iteration": loop_seconds / max(1, sched.iterations),
        "backbone_train_steps": train_steps,
        "final_loss": loss_value,
    }
