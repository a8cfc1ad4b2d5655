"""TeacherNorm: fixed per-coordinate mean/std of a teacher's cls and patch tokens (paper 3.3).

Measured over the first N batches before training, then frozen. The statistics are buffers, so
they travel in every checkpoint and are reused on resume, never re-measured.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from .encoder import EncoderOutput

NORM_FILE = "teacher_norm.safetensors"


class TeacherNorm(nn.Module):
    """Per-teacher, per-coordinate normalization, separately for cls and patch tokens."""

    def __init__(self, teacher_dims: dict[str, tuple[int, int]], eps: float = 1e-6, rel_floor: float = 1e-2):
        super().__init__()
        self.eps = eps
        # A coordinate that is (nearly) constant in the measurement batches but fires later (a ReLU
        # channel dead on those images) would get a ~eps std and blow its targets up by ~1/eps. So
        # each std is floored at rel_floor x the median std of its teacher's tokens of that kind.
        self.rel_floor = rel_floor
        self.teachers = list(teacher_dims)
        for t, (c, p) in teacher_dims.items():
            for kind, dim in (("cls", c), ("patch", p)):
                self.register_buffer(f"{t}__{kind}_mean", torch.zeros(dim))
                self.register_buffer(f"{t}__{kind}_std", torch.ones(dim))
                self.register_buffer(f"{t}__{kind}_count", torch.zeros((), dtype=torch.float64))
                # running sums for measurement; float64 so many batches add up exactly enough
                self.register_buffer(
                    f"{t}__{kind}_sum", torch.zeros(dim, dtype=torch.float64), persistent=False
                )
                self.register_buffer(
                    f"{t}__{kind}_sumsq", torch.zeros(dim, dtype=torch.float64), persistent=False
                )
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    def _buf(self, teacher: str, name: str) -> torch.Tensor:
        return getattr(self, f"{teacher}__{name}")

    def dims(self, teacher: str) -> tuple[int, int]:
        """(cls width, patch width) of one teacher."""
        return self._buf(teacher, "cls_mean").shape[0], self._buf(teacher, "patch_mean").shape[0]

    def stats(self, teacher: str, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of one teacher's "cls" or "patch" tokens: the buffers themselves, not copies.

        `x * std + mean` takes normalized targets (what the adapter heads learn) back to the
        teacher's own space.
        """
        if teacher not in self.teachers or kind not in ("cls", "patch"):
            raise KeyError(f"TeacherNorm has no {kind!r} statistics for teacher {teacher!r}")
        return self._buf(teacher, f"{kind}_mean"), self._buf(teacher, f"{kind}_std")

    def denormalize(self, teacher: str, x: torch.Tensor, kind: str = "cls") -> torch.Tensor:
        """Normalized targets (what the adapter heads learn to predict) back in the teacher's own
        space: `x * std + mean` for one teacher's "cls" or "patch" tokens."""
        mean, std = self.stats(teacher, kind)
        return x * std.to(x) + mean.to(x)

    @torch.no_grad()
    def observe(self, teacher: str, out: EncoderOutput) -> None:
        """Accumulate statistics from one batch of raw teacher outputs."""
        if bool(self.frozen):
            raise RuntimeError("TeacherNorm is frozen; statistics are measured once, before training")
        for kind, x in (("cls", out.cls), ("patch", out.patches)):
            x = x.reshape(-1, x.shape[-1]).double()
            self._buf(teacher, f"{kind}_sum").add_(x.sum(0))
            self._buf(teacher, f"{kind}_sumsq").add_((x * x).sum(0))
            self._buf(teacher, f"{kind}_count").add_(x.shape[0])

    @torch.no_grad()
    def freeze(self) -> None:
        """Turn the accumulated sums into mean/std and fix them."""
        for t in self.teachers:
            for kind in ("cls", "patch"):
                n = self._buf(t, f"{kind}_count")
                if n < 2:
                    raise RuntimeError(f"TeacherNorm: too few samples for teacher '{t}' {kind} tokens")
                mean = self._buf(t, f"{kind}_sum") / n
                var = (self._buf(t, f"{kind}_sumsq") / n - mean * mean).clamp_min(0) * (n / (n - 1))
                self._buf(t, f"{kind}_mean").copy_(mean.float())
                std = var.sqrt().float()
                floor = max(self.eps, self.rel_floor * float(std.median()))
                self._buf(t, f"{kind}_std").copy_(std.clamp_min(floor))
        self.frozen.fill_(True)

    def normalize(self, teacher: str, out: EncoderOutput) -> EncoderOutput:
        def f(kind: str, x: torch.Tensor) -> torch.Tensor:
            return (x - self._buf(teacher, f"{kind}_mean")) / self._buf(teacher, f"{kind}_std")

        return EncoderOutput(
            cls=f("cls", out.cls), patches=f("patch", out.patches), registers=None, grid=out.grid
        )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / NORM_FILE
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> TeacherNorm:
        path = Path(directory) / NORM_FILE if Path(directory).is_dir() else Path(directory)
        try:
            state = load_file(str(path))
            dims: dict[str, list[int]] = {}
            for k, v in state.items():
                if k.endswith("_mean"):
                    t, kind = k[: -len("_mean")].split("__")
                    dims.setdefault(t, [0, 0])[0 if kind == "cls" else 1] = v.shape[0]
            norm = cls({t: (d[0], d[1]) for t, d in dims.items()})
            norm.load_state_dict(state, strict=True)
        except Exception as e:
            raise CheckpointError(
                f"{path}: not a readable teacher-norm file ({type(e).__name__}: {e})"
            ) from None
        return norm
