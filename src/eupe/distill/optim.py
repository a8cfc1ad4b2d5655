"""AdamW parameter groups (no decay on norms, biases, tokens) and the warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..runtime import policy_device_type

# Learned tokens and positional tables are not weights to shrink toward zero.
_NO_DECAY_NAMES = ("token", "pos_embed", "rope", "gamma")


def param_groups(modules: Iterable[tuple[str, nn.Module]], weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices/kernels, and 1-D params (norms, biases) + tokens."""
    decay, no_decay = [], []
    for prefix, module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            full = f"{prefix}.{name}"
            if p.ndim <= 1 or any(k in full.rsplit(".", 1)[-1] for k in _NO_DECAY_NAMES):
                no_decay.append(p)
            else:
                decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    modules: Iterable[tuple[str, nn.Module]],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW over `param_groups`. On CUDA the fused kernel (one launch for every parameter); on the
    CPU the per-parameter loop (foreach=False), which is bit-reproducible across resume."""
    kind = {"fused": True} if fused else {"foreach": False}
    return torch.optim.AdamW(param_groups(modules, weight_decay), lr=lr, betas=tuple(betas), **kind)


LR_SCALING = ("none", "linear", "sqrt")


def lr_scale(train: Any) -> float:
    """Factor on `train.lr` and `train.min_lr`: 1 ("none"), global_batch / lr_reference_batch
    ("linear"), or its square root ("sqrt"); see docs/fidelity.md for the default."""
    ratio = train.global_batch / train.lr_reference_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[train.lr_scaling]


def build_optimization(
    modules: list[tuple[str, nn.Module]], train: Any, device: torch.device
) -> tuple[torch.optim.AdamW, CosineSchedule]:
    """The optimizer and schedule of one student, from the `train` config section."""
    scale = lr_scale(train)
    optimizer = build_optimizer(
        modules, train.lr * scale, train.weight_decay, train.betas, fused=policy_device_type(device) == "cuda"
    )
    schedule = CosineSchedule(
        optimizer, train.lr * scale, train.max_steps, train.warmup_steps, train.min_lr * scale
    )
    return optimizer, schedule


class CosineSchedule:
    """Linear warmup to `lr` over `warmup` steps, then cosine decay to `min_lr` at `total` steps.

    Its state is just the number of optimizer steps taken, so it checkpoints as JSON.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, lr: float, total: int, warmup: int, min_lr: float = 0.0
    ):
        self.optimizer, self.lr, self.total, self.warmup, self.min_lr = optimizer, lr, total, warmup, min_lr
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_count)

    @property
    def current_lr(self) -> float:
        return self.lr_at(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "lr": self.lr, "total": self.total, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
