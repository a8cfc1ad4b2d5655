"""The distillation loss of paper section 3.2, per teacher and summed over teachers.

Per teacher i, on the student's adapted tokens z and the teacher's normalized tokens y:

    L_i = weight_i * ( cos(z_cls, y_cls) + gamma_i * (alpha * cos(z_patch, y_patch)
                                                     + beta * smoothL1(z_patch, y_patch)) )

where cos(a, b) = 1 - cosine similarity, averaged over tokens (and the batch). Before the patch
terms, the smaller of the two token grids is 2-D bicubic-interpolated to the larger one (Fig. 3),
so a stride-32 ConvNeXt student is compared with a stride-16 teacher at the teacher's grid, and a
512 px student with a 256 px teacher at the student's grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TERMS = ("cls_cos", "patch_cos", "patch_sl1", "total")


@dataclass(frozen=True)
class LossWeights:
    """alpha/beta from the paper (0.9/0.1); weight and gamma (patch weight, Table 10) per teacher."""

    alpha: float = 0.9
    beta: float = 0.1
    weight: float = 1.0
    gamma: float = 1.0
    smooth_l1_beta: float = 1.0  # the Huber threshold of smooth L1 (PyTorch's default)


def cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over all tokens of 1 - cos(a, b), vectors along the last dimension."""
    return (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


def resize_tokens(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """[B, h*w, D] tokens on `grid` -> [B, H*W, D] on `size`, bicubic (the paper's choice)."""
    if tuple(grid) == tuple(size):
        return tokens
    b, n, d = tokens.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} tokens do not fill a {grid[0]}x{grid[1]} grid")
    fmap = tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1]).float()
    fmap = F.interpolate(fmap, size=tuple(size), mode="bicubic", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)


def match_grids(
    student: torch.Tensor,
    student_grid: tuple[int, int],
    teacher: torch.Tensor,
    teacher_grid: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interpolate whichever token grid has fewer tokens to the other's grid; return both."""
    s_grid, t_grid = tuple(student_grid), tuple(teacher_grid)
    if s_grid == t_grid:
        return student, teacher
    if s_grid[0] * s_grid[1] < t_grid[0] * t_grid[1]:
        return resize_tokens(student, s_grid, t_grid), teacher
    return student, resize_tokens(teacher, t_grid, s_grid)


def teacher_loss(
    student_cls: torch.Tensor,
    student_patches: torch.Tensor,
    student_grid: tuple[int, int],
    target_cls: torch.Tensor,
    target_patches: torch.Tensor,
    target_grid: tuple[int, int],
    weights: LossWeights = LossWeights(),
) -> dict[str, torch.Tensor]:
    """Every term of one teacher's loss; "total" is the weighted L_i that enters the sum."""
    z_patch, y_patch = match_grids(student_patches, student_grid, target_patches, target_grid)
    cls_cos = cosine_loss(student_cls, target_cls)
    patch_cos = cosine_loss(z_patch, y_patch)
    patch_sl1 = F.smooth_l1_loss(z_patch.float(), y_patch.float(), beta=weights.smooth_l1_beta)
    patch = weights.alpha * patch_cos + weights.beta * patch_sl1
    total = weights.weight * (cls_cos + weights.gamma * patch)
    return {"cls_cos": cls_cos, "patch_cos": patch_cos, "patch_sl1": patch_sl1, "total": total}


def total_loss(
    per_teacher: dict[str, dict[str, torch.Tensor]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the teachers' totals, and every term as `loss/<teacher>/<term>` for logging: detached
    tensors that stay on the device (reading them is a host sync; the trainer does it on logging
    steps only)."""
    total = sum(terms["total"] for terms in per_teacher.values())
    assert isinstance(total, torch.Tensor), "at least one teacher is needed"
    logged = {f"loss/{t}/{k}": v.detach() for t, terms in per_teacher.items() for k, v in terms.items()}
    return total, logged
