"""Adapter heads: project student tokens into each teacher's space (paper section 4.1).

They travel with a distilled model (`final/heads.safetensors`): zero-shot and chained teachers use them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from .encoder import EncoderOutput

HEADS_FILE = "heads.safetensors"


class AdapterHead(nn.Sequential):
    """Linear (no bias) -> LayerNorm -> GELU -> Linear (no bias)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim


class TeacherHeads(nn.Module):
    """One cls head and one patch head per teacher, keyed by teacher name."""

    def __init__(self, student_dim: int, teacher_dims: dict[str, tuple[int, int]], hidden_dim: int):
        """teacher_dims maps a teacher name to its (cls_dim, patch_dim)."""
        super().__init__()
        self.student_dim, self.hidden_dim = student_dim, hidden_dim
        self.teacher_dims = dict(teacher_dims)
        self.cls = nn.ModuleDict(
            {t: AdapterHead(student_dim, hidden_dim, c) for t, (c, _) in teacher_dims.items()}
        )
        self.patch = nn.ModuleDict(
            {t: AdapterHead(student_dim, hidden_dim, p) for t, (_, p) in teacher_dims.items()}
        )

    def forward(
        self, out: EncoderOutput, teachers: Sequence[str]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Student output -> {teacher: (cls [B, Dc], patches [B, N, Dp])} in each teacher's normalized
        space. All teachers in one call: under FSDP the heads are one unit, gathered once per forward."""
        if isinstance(teachers, str):
            raise TypeError(f"teachers is a list of names; got the string {teachers!r} (use [{teachers!r}])")
        return {t: (self.cls[t](out.cls), self.patch[t](out.patches)) for t in teachers}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / HEADS_FILE
        meta = {
            "student_dim": self.student_dim,
            "hidden_dim": self.hidden_dim,
            "teacher_dims": {t: list(d) for t, d in self.teacher_dims.items()},
        }
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"eupe": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, directory: str | Path) -> TeacherHeads:
        path = Path(directory) / HEADS_FILE if Path(directory).is_dir() else Path(directory)
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["eupe"])
            state = load_file(str(path))
            heads = cls(
                meta["student_dim"],
                {t: tuple(d) for t, d in meta["teacher_dims"].items()},
                meta["hidden_dim"],
            )
            heads.load_state_dict(state, strict=True)
        except Exception as e:
            raise CheckpointError(
                f"{path}: not a readable adapter-heads file ({type(e).__name__}: {e})"
            ) from None
        return heads
