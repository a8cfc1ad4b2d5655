"""The three demo benchmarks, on in-memory sets from `data.py`, for any frozen model.

A model is a `Featurizer`: [B,3,H,W] images in [0,1] -> `EncoderOutput` (a `Teacher` is one; wrap a
student with `encoder_featurizer`). Each benchmark only reads `cls` or the patch tokens, so teachers
of any width and stride (EfficientNet at stride 32, the OCR neck at stride 16, ViTs at 16) are
measured the same way.

- `knn_accuracy`: leave-one-out k-NN (the eval suite's release rule on `cls`) over the held-out Tux Paint cut-outs.
- `text_iou`: a linear text probe on frozen patch tokens (trained on one text set, tested on
  another), IoU of predicted text pixels vs the exact masks, at `eval_side` resolution.
- `pck`: dense correspondence by nearest-neighbour patch matching between an image and its warp;
  a match is correct within alpha x max(H, W) of where the known homography sends the point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..eval.knn import vote_release
from ..models.encoder import EncoderOutput
from ..models.preprocess import Normalize, resize
from .data import correspondences

Featurizer = Callable[[torch.Tensor], EncoderOutput]


def encoder_featurizer(encoder: torch.nn.Module, resolution: int | None = None) -> Featurizer:
    """An `eupe` Encoder (ImageNet-normalized input) as a featurizer, optionally resizing to `resolution`."""
    normalize = Normalize()

    @torch.inference_mode()
    def run(images01: torch.Tensor) -> EncoderOutput:
        if resolution is not None:
            images01 = resize(images01.clamp(0, 1), resolution)
        return encoder.eval()(normalize(images01.clamp(0, 1)))

    return run


def position_only(patch: int = 16, seed: int = 0) -> Featurizer:
    """A content-free reference: each patch token is the one-hot of its grid position and the cls
    token is noise seeded by the image's pixel sum. What it scores, a benchmark gives for free: kNN
    at chance, text IoU from where text tends to be, PCK from points the warp leaves in place."""

    def run(images01: torch.Tensor) -> EncoderOutput:
        b, _, h, w = images01.shape
        grid = (h // patch, w // patch)
        patches = torch.eye(grid[0] * grid[1]).unsqueeze(0).repeat(b, 1, 1)
        seeds = [seed * 1_000_003 + int(x.mul(255).sum()) for x in images01]
        cls = torch.stack([torch.randn(32, generator=torch.Generator().manual_seed(k)) for k in seeds])
        return EncoderOutput(cls=cls, patches=patches, registers=None, grid=grid)

    return run


def to01(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [0,1]."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div_(255)


def _batches(images: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(images), batch_size):
        yield to01(images[i : i + batch_size])


@torch.inference_mode()
def embed(
    model: Featurizer, images: np.ndarray, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(cls [N,D] float32, patch maps [N,D',h,w] float32, grid) of a whole set."""
    cls, maps = [], []
    for x in _batches(images, batch_size):
        out = model(x)
        cls.append(out.cls.float())
        maps.append(out.patch_map().float())
    return torch.cat(cls), torch.cat(maps), tuple(maps[0].shape[-2:])


# --- semantic: k-NN ------------------------------------------------------------------------------
def knn_accuracy(model: Featurizer, images: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Leave-one-out k-NN accuracy on the cls token (`leave_one_out_knn`)."""
    cls, _, _ = embed(model, images)
    return leave_one_out_knn(cls, torch.as_tensor(labels), k)


def leave_one_out_knn(feats: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Every image classified by the other images: the release's k-NN rule (`eupe.eval.knn`:
    cosine top-k, votes weighted by exp(sim / 0.07)) with the image itself left out of its
    neighbours (the demo's benchmark set has no separate train split)."""
    f = F.normalize(feats.float(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(float("-inf"))
    top_sim, top_idx = sim.topk(k, dim=1)
    pred = vote_release(top_sim, labels[top_idx], k, int(labels.max()) + 1)
    return float((pred == labels).float().mean())


# --- text: linear probe on patch tokens ------------------------------------------------------------
def _soft_targets(masks: np.ndarray, side: int) -> torch.Tensor:
    m = torch.from_numpy(masks[:, None].astype(np.float32))
    return F.adaptive_avg_pool2d(m, side)[:, 0]


def text_iou(
    model: Featurizer,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    eval_side: int = 56,
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
) -> float:
    """Linear probe text IoU.

    A 1x1 linear layer on standardized patch tokens is trained (full batch, Adam, BCE) against the
    text fraction of each probe-grid cell; its logits are bilinearly upsampled to eval_side x
    eval_side and thresholded at 0. IoU is over all test pixels against masks pooled to that grid
    (a cell is text if >= half its pixels are).
    """
    _, fmap_tr, _ = embed(model, train[0])
    _, fmap_te, _ = embed(model, test[0])
    mean = fmap_tr.mean(dim=(0, 2, 3), keepdim=True)
    std = fmap_tr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    x_tr, x_te = (fmap_tr - mean) / std, (fmap_te - mean) / std
    y_tr = _soft_targets(train[1], eval_side)
    pos = float(y_tr.mean().clamp(1e-4, 1 - 1e-4))
    gen = torch.Generator().manual_seed(seed)
    d = x_tr.shape[1]
    weight = (torch.randn(1, d, 1, 1, generator=gen) * 0.01).requires_grad_(True)
    bias = torch.zeros(1).requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            logits = F.conv2d(x_tr, weight, bias)
            logits = F.interpolate(logits, size=(eval_side, eval_side), mode="bilinear", align_corners=False)[
                :, 0
            ]
            loss = F.binary_cross_entropy_with_logits(logits, y_tr, pos_weight=torch.tensor((1 - pos) / pos))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = F.conv2d(x_te, weight, bias)
        pred = (
            F.interpolate(logits, size=(eval_side, eval_side), mode="bilinear", align_corners=False)[:, 0] > 0
        )
    gt = _soft_targets(test[1], eval_side) >= 0.5
    return float((pred & gt).sum() / (pred | gt).sum().clamp_min(1))


# --- dense: correspondence PCK -------------------------------------------------------------------
def _sample(fmap: torch.Tensor, points: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear features [K, D] at pixel points (x, y) of an image of `size` (w, h)."""
    w, h = size
    grid = torch.from_numpy(points).float().clone()
    grid[:, 0] = (grid[:, 0] + 0.5) / w * 2 - 1
    grid[:, 1] = (grid[:, 1] + 0.5) / h * 2 - 1
    out = F.grid_sample(fmap[None], grid[None, None], mode="bilinear", align_corners=False)
    return out[0, :, 0].T


def match_pck(
    fmap_src: torch.Tensor,
    fmap_dst: torch.Tensor,
    h: np.ndarray,
    src_size: tuple[int, int],
    dst_size: tuple[int, int],
    alpha: float = 0.1,
    step: int = 16,
) -> tuple[int, int]:
    """(correct, total) for grid points of src matched to their most similar dst patch center.

    Only points that move by more than the threshold count: a point the warp leaves within reach
    of its own position would be "matched" by any features that encode position alone (a
    content-free featurizer scores 0.56 on the demo's warps when every point counts)."""
    thresh = alpha * max(dst_size)
    pts, truth = correspondences(h, src_size, dst_size, step=step, margin=0.0)
    moving = np.linalg.norm(truth - pts, axis=1) > thresh
    pts, truth = pts[moving], truth[moving]
    if len(pts) == 0:
        return 0, 0
    q = F.normalize(_sample(fmap_src, pts, src_size), dim=1)
    d, gh, gw = fmap_dst.shape
    bank = F.normalize(fmap_dst.reshape(d, -1).T, dim=1)
    best = (q @ bank.T).argmax(1).numpy()
    ys, xs = np.divmod(best, gw)
    pred = np.stack([(xs + 0.5) * dst_size[0] / gw - 0.5, (ys + 0.5) * dst_size[1] / gh - 0.5], axis=1)
    correct = int((np.linalg.norm(pred - truth, axis=1) <= thresh).sum())
    return correct, len(pts)


def pck(
    model: Featurizer,
    src: np.ndarray,
    dst: np.ndarray,
    hs: np.ndarray,
    alpha: float = 0.1,
    graf: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """PCK@alpha pooled over the points of every pair: the warps, plus graf1 -> graf3 if given.

    Also reported separately: `pck_warps` (the warped pairs only) and `pck_graf` (graf only, the
    same 16 px point grid). Every image is matched at its own size, so a model's input side only
    changes the features, never the threshold.
    """
    _, f_src, _ = embed(model, src)
    _, f_dst, _ = embed(model, dst)
    size = (src.shape[2], src.shape[1])
    correct = total = 0
    for i in range(len(src)):
        c, t = match_pck(f_src[i], f_dst[i], hs[i], size, size, alpha)
        correct, total = correct + c, total + t
    out = {"pck": correct / max(1, total), "pck_warps": correct / max(1, total), "points": float(total)}
    if graf is not None:
        g1, g3, hg = graf
        _, f1, _ = embed(model, g1[None])
        _, f3, _ = embed(model, g3[None])
        gsize = (g1.shape[1], g1.shape[0])
        c, t = match_pck(f1[0], f3[0], hg, gsize, gsize, alpha)
        out["pck_graf"] = c / max(1, t)
        out["pck"] = (correct + c) / max(1, total + t)
        out["points"] = float(total + t)
    return out
