"""PCA pictures of patch tokens (paper Figure 4): 3 principal components -> RGB, images x models.

Per image (default) or jointly over the whole image set (`joint=true`, colours then mean the same
thing across images), the centred patch tokens are projected on their first three principal
components; each component is stretched to [0, 1] between its 1st and 99th percentile and shown
as one colour channel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .common import EvalResult, resolve_settings, settings_dict, snap
from .datasets import IMAGE_EXTS, load_rgb
from .models import load_model
from .registry import register_task
from .transforms import resize_image, to_tensor01


@dataclass
class PCASettings:
    resolution: int = 448  # long side of the model input (snapped to the stride)
    joint: bool = False
    max_images: int = 8
    cell_size: int = 224  # pixels per picture in the grid
    device: str = "auto"


def pca_rgb(tokens: list[torch.Tensor]) -> tuple[list[np.ndarray], float]:
    """Project each [N, D] token set on the 3 leading components of all of them together.

    Returns per-set [N, 3] values in [0, 1] and the fraction of variance the 3 components explain.
    """
    x = torch.cat(tokens).double()
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:3]
    explained = float((s[:3] ** 2).sum() / (s**2).sum().clamp_min(1e-30))
    proj = x @ comps.T
    # a deterministic sign: the component's largest-magnitude projection is positive
    sign = torch.sign(proj.gather(0, proj.abs().argmax(0, keepdim=True)))
    proj = proj * torch.where(sign == 0, torch.ones_like(sign), sign)
    lo = torch.quantile(proj, 0.01, dim=0)
    hi = torch.quantile(proj, 0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1).float().numpy()
    out, start = [], 0
    for t in tokens:
        out.append(rgb[start : start + len(t)])
        start += len(t)
    if len(comps) < 3:  # fewer than 3 dims: pad with zeros (black channels)
        out = [np.pad(o, ((0, 0), (0, 3 - o.shape[1]))) for o in out]
    return out, explained


def list_images(data: str | os.PathLike, limit: int) -> list[Path]:
    p = Path(data)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ConfigError(f"{p}: not an image file or a folder of images")
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ConfigError(f"{p}: no images ({', '.join(sorted(IMAGE_EXTS))})")
    return files[:limit] if limit > 0 else files


@register_task(
    "pca",
    settings=PCASettings,
    label="PCA",
    help="PCA pictures of patch tokens: a grid of images x models (pca.png)",
    example="joint=true max_images=4",
    multi_model=True,
)
def pca(
    models: Any,
    data: str | os.PathLike,
    weights: Any = None,
    output_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> EvalResult:
    """Write `pca.png` (rows: images; columns: the input, then one column per model)."""
    s = resolve_settings(PCASettings, overrides)
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    weights_list = list(weights) if isinstance(weights, (list, tuple)) else [weights] * len(models)
    if len(weights_list) != len(models):
        raise ConfigError(f"{len(weights_list)} weights for {len(models)} models; give one per model")
    files = list_images(data, s.max_images)
    images = [to_tensor01(np.asarray(load_rgb(f))) for f in files]
    columns, names, explained, random_init = [], [], {}, {}
    for spec, w in zip(models, weights_list):
        m = load_model(spec, w, s.device)
        tokens, grids = [], []
        for img in images:
            h, wd = img.shape[-2:]
            r = s.resolution / max(h, wd)
            out = m.encode(
                m.normalize(resize_image(img, (snap(h * r, m.stride), snap(wd * r, m.stride)))[None])
            )
            tokens.append(out.patches[0].float().cpu())
            grids.append(out.grid)
        if s.joint:
            rgbs, ev = pca_rgb(tokens)
            evs = [ev]
        else:
            pairs = [pca_rgb([t]) for t in tokens]
            rgbs, evs = [p[0][0] for p in pairs], [p[1] for p in pairs]
        columns.append([rgb.reshape(*g, 3) for rgb, g in zip(rgbs, grids)])
        name = m.name if m.name not in names else f"{m.name} ({len(names)})"
        names.append(name)
        explained[name] = float(np.mean(evs))
        random_init[name] = m.random_init
    result = EvalResult(
        task="pca",
        metric="explained_variance_3",
        value=float(np.mean(list(explained.values()))),
        model=", ".join(names),
        dataset=str(data),
        settings=settings_dict(s),
        extra={
            "explained_variance": explained,
            "random_init": random_init,
            "images": [str(f) for f in files],
        },
    )
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        draw_grid(images, columns, names, out / "pca.png", s.cell_size)
        result.extra["figure"] = str(out / "pca.png")
        result.write(out)
    return result


def draw_grid(
    images: list[torch.Tensor], columns: list[list[np.ndarray]], names: list[str], path: Path, cell: int
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(images), len(columns) + 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * cell / 100, rows * cell / 100 + 0.4), squeeze=False, dpi=100
    )
    for r, img in enumerate(images):
        aspect_hw = img.shape[-2:]
        axes[r][0].imshow(img.permute(1, 2, 0).numpy())
        for c, col in enumerate(columns, start=1):
            # nearest-neighbour upsampling keeps the patch grid visible, like the paper's figure
            axes[r][c].imshow(col[r], interpolation="nearest", extent=(0, aspect_hw[1], aspect_hw[0], 0))
    for c, title in enumerate(["input", *names]):
        axes[0][c].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout(pad=0.3)
    fig.savefig(path)
    plt.close(fig)
