"""Training a linear probe on a frozen backbone, with an optional frozen-feature cache.

A probe's 40k iterations would otherwise run the backbone 640k times. Since the backbone is frozen,
its patch features depend only on the (augmented) input, so `cache_views=V` computes features for
V fixed augmented views of every training image once (V = 1: one pass, "once per epoch") and
trains the head on batches drawn from that cache. The cost: fewer distinct augmentations, which
`cache_refresh=R` softens by rebuilding the cache from fresh augmentations every R steps (R = the
steps of one pass over the cache: "a new cache per epoch").
`cache_views=0` recomputes the backbone on fresh augmentations every step (the paper's protocol).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .common import lr_at
from .models import EvalModel

# one augmented training view: (image [3,S,S] float in [0,1], target [S,S])
ViewFn = Callable[[int, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ProbeSchedule:
    iterations: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_iters: int
    cache_views: int = 0
    seed: int = 0
    num_workers: int = 0
    cache_refresh: int = 0  # rebuild the cache with fresh augmentations every this many steps (0: never)


def patch_features(model: EvalModel, images01: torch.Tensor) -> torch.Tensor:
    """Frozen patch tokens (after the final norm) as a [B, D, h, w] map."""
    return model.encode(model.normalize(images01.to(model.device))).patch_map().float()


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
) -> dict[str, float]:
    """Train `head` (feature map -> predictions) with AdamW; returns timing and the last loss."""
    head.to(model.device).train()
    opt = torch.optim.AdamW(head.parameters(), lr=sched.lr, weight_decay=sched.weight_decay)
    gen = torch.Generator().manual_seed(sched.seed)
    cache = batches = None
    cache_seconds, cache_builds = 0.0, 0

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
    if cache is None:
        # the whole sampling order up front: item k of the run is image order[k], view seed k
        order = torch.randint(num_images, (sched.iterations * sched.batch_size,), generator=gen).numpy()
        batches = iter(_loader(_Views(view_fn, order, sched.seed), sched.batch_size, sched.num_workers))
    start = time.perf_counter()
    loss_value = float("nan")
    bar = tqdm(range(sched.iterations), desc=desc, unit="it", leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, sched.iterations, sched.warmup_iters, sched.lr)
        if cache is not None:
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
        opt.step()
        if step % 10 == 0 or step == sched.iterations - 1:
            loss_value = float(loss.detach())
            bar.set_postfix(loss=f"{loss_value:.4f}")
    head.eval()
    # the first cache build ran before `start`; refreshes ran inside the loop and count as cache time
    loop_seconds = time.perf_counter() - start - (cache_seconds - first_build_seconds)
    return {
        "train_seconds": loop_seconds + cache_seconds,
        "cache_seconds": cache_seconds,
        "cache_builds": cache_builds,
        "seconds_per_iteration": loop_seconds / max(1, sched.iterations),
        "final_loss": loss_value,
    }


def random_crop_flip(
    image: torch.Tensor, target: torch.Tensor, size: tuple[int, int], fill: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random `size` crop (padding with 0 / `fill` where the input is smaller) and a random h-flip."""
    h, w = image.shape[-2:]
    ch, cw = size
    ph, pw = max(0, ch - h), max(0, cw - w)
    if ph or pw:
        image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0.0)
        target = torch.nn.functional.pad(target, (0, pw, 0, ph), value=fill)
        h, w = image.shape[-2:]
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    image, target = image[..., y : y + ch, x : x + cw], target[..., y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        image, target = image.flip(-1), target.flip(-1)
    return image.contiguous(), target.contiguous()


def to_tensor01(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> [3,H,W] float in [0,1]."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div_(255)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = torch.nn.functional.interpolate(
        image[None], size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return out[0].clamp_(0, 1)


def resize_nearest(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return torch.nn.functional.interpolate(target[None, None].float(), size=size, mode="nearest")[0, 0].to(
        target.dtype
    )
