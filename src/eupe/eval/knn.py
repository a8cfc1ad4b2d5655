"""k-nearest-neighbour classification on the cls token (IN1k-KNN, paper section 8.1).

Input: resize 256, center crop 224, the cls token. Two scoring protocols, by name:

- `release` (default): what Meta's released evaluation code does (facebookresearch/EUPE
  `eupe/eval/knn.py`, the DINOv2 protocol, facebookresearch/dinov2 `dinov2/eval/knn.py`), i.e. the
  code behind the published numbers. Features are L2-normalized; the neighbours are the top-k cosine
  similarities; each neighbour votes with weight exp(sim / T), T = `temperature` = 0.07 (the release
  takes a softmax over its top max(k) similarities and sums the first k: the same per-image scale
  factor, so the same prediction); the class with the largest summed weight wins. k in
  {10, 20, 100, 200}; a k above the number of train images uses them all (the release clamps k to
  `len(train_features)` the same way).
- `paper`: the paper's text (section 8.1): the k train images with the smallest L2 distance
  between raw (unnormalized) class tokens, majority vote; a tie in votes goes to the tied class
  with the smallest summed distance.

Similarities are computed in chunks of the bank with a running top-k, and over chunks of the
val set, so the [val x train] matrix never exists (ImageNet: 50k x 1.28M).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

from ..errors import ConfigError
from .common import EvalResult, resolve_settings, settings_dict
from .datasets import ClassFolder, class_folder_splits
from .models import EvalModel, load_model
from .registry import register_task

PROTOCOLS = ("release", "paper")
MAIN_K = 10  # results.json's `value` is top-1 at this k (the paper's k) when it was evaluated


@dataclass
class KNNSettings:
    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    protocol: str = "release"  # release: cosine + softmax(sim/T) vote; paper: L2 + majority vote
    temperature: float = 0.07  # release protocol only
    resolution: int = 224  # center-crop side
    resize: int = 0  # shorter side before the crop; 0 = resolution * 256 / 224
    batch_size: int = 64
    num_workers: int = 4
    chunk_size: int = 8192  # bank rows per similarity block
    train_split: str = "train"
    val_split: str = "val"
    device: str = "auto"

    def check(self) -> None:
        if not self.k or min(self.k) < 1:
            raise ConfigError(f"k must be a non-empty list of positive integers, got {self.k}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol={self.protocol!r}: choose from {', '.join(PROTOCOLS)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")


def classification_transform(model: EvalModel, resolution: int, resize: int = 0) -> transforms.Compose:
    if resolution % model.stride:
        raise ConfigError(
            f"resolution={resolution} is not a multiple of {model.name}'s stride {model.stride}; "
            f"try {round(resolution / model.stride) * model.stride}"
        )
    return transforms.Compose(
        [
            transforms.Resize(
                resize or round(resolution * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize(model.mean, model.std),
        ]
    )


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, base: ClassFolder, transform: Any):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[i]
        return self.transform(image), label


@torch.no_grad()
def extract_cls(
    model: EvalModel, dataset: ClassFolder, transform: Any, batch_size: int, num_workers: int, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """cls tokens [N, D] (float32, on the model's device) and labels [N] of a class-folder set."""
    loader = DataLoader(
        _Transformed(dataset, transform), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, unit="batch", leave=False):
        feats.append(model.encode(images).cls.float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels).to(model.device)


def running_topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    chunk_size: int = 8192,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k scores `queries @ bank.T (+ bias)` of each query, one bank chunk at a time.

    `bias` [len(bank)] is added to every query's scores (-|b|^2 turns the top dot products into the
    nearest L2 neighbours). Returns (scores [Q, k'], bank indices [Q, k']) sorted descending,
    k' = min(k, len(bank)).
    """
    k = min(k, bank.shape[0])
    best_s = torch.full((queries.shape[0], 0), float("-inf"), device=queries.device, dtype=queries.dtype)
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[0], chunk_size):
        sims = queries @ bank[start : start + chunk_size].T
        if bias is not None:
            sims = sims + bias[start : start + chunk_size]
        idx = torch.arange(start, start + sims.shape[1], device=queries.device).expand_as(sims)
        s, pos = torch.cat([best_s, sims], 1).topk(min(k, best_s.shape[1] + sims.shape[1]), dim=1)
        best_i = torch.cat([best_i, idx], 1).gather(1, pos)
        best_s = s
    return best_s, best_i


def vote_release(
    sims: torch.Tensor, labels: torch.Tensor, k: int, num_classes: int, temperature: float = 0.07
) -> torch.Tensor:
    """The release's vote: each of the first k neighbours adds exp(sim / T) to its class; argmax.

    `sims` [Q, K] sorted descending, `labels` [Q, K] their classes. Subtracting each row's best
    similarity rescales a row's weights by one positive factor, which changes no prediction.
    """
    sims, labels = sims[:, :k].double(), labels[:, :k]
    weights = torch.exp((sims - sims[:, :1]) / temperature)
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=torch.float64)
    return scores.scatter_add_(1, labels, weights).argmax(1)


def vote_paper(dists: torch.Tensor, labels: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """Majority label among the first k neighbours; a tie goes to the smallest summed distance.

    `dists` [Q, K] sorted ascending, `labels` [Q, K] their classes.
    """
    dists, labels = dists[:, :k].double(), labels[:, :k]
    votes = torch.zeros(dists.shape[0], num_classes, device=dists.device, dtype=torch.float64)
    votes.scatter_add_(1, labels, torch.ones_like(dists))
    summed = torch.zeros_like(votes).scatter_add_(1, labels, dists)
    tied = votes == votes.max(1, keepdim=True).values
    return summed.masked_fill(~tied, float("inf")).argmin(1)


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    ks: list[int],
    num_classes: int,
    protocol: str = "release",
    temperature: float = 0.07,
    chunk_size: int = 8192,
    query_chunk: int = 1024,
) -> dict[int, torch.Tensor]:
    """Predicted class of every val feature for every k in `ks` (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={protocol!r}: choose from {', '.join(PROTOCOLS)}")
    if not ks or min(ks) < 1:
        raise ConfigError(f"k must be a non-empty list of positive integers, got {ks}")
    bank, queries = train_feats.float(), val_feats.float()
    bias = None
    if protocol == "release":
        bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    else:  # |q - b|^2 = |q|^2 - (2 q.b - |b|^2): the top scores are the nearest neighbours
        bias = -(bank * bank).sum(1)
    train_labels = train_labels.to(bank.device)
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(queries), query_chunk):
        q = queries[start : start + query_chunk]
        if protocol == "release":
            s, i = running_topk(q, bank, max(ks), chunk_size)
        else:
            s, i = running_topk(2 * q, bank, max(ks), chunk_size, bias)
            s = ((q * q).sum(1, keepdim=True).double() - s.double()).clamp_min(0).sqrt()  # distances
        nb_labels = train_labels[i]
        for k in ks:
            if protocol == "release":
                preds[k].append(vote_release(s, nb_labels, k, num_classes, temperature))
            else:
                preds[k].append(vote_paper(s, nb_labels, k, num_classes))
    empty = torch.zeros(0, dtype=torch.long, device=queries.device)
    return {k: torch.cat(v) if v else empty for k, v in preds.items()}


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    ks: list[int],
    num_classes: int,
    protocol: str = "release",
    temperature: float = 0.07,
    chunk_size: int = 8192,
    query_chunk: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy `{k: top1}` for every k in `ks` under `protocol` ("release" or "paper").

    A k above the number of train features uses all of them.
    """
    preds = knn_predict(
        train_feats, train_labels, val_feats, ks, num_classes, protocol, temperature, chunk_size, query_chunk
    )
    truth = val_labels.to(next(iter(preds.values())).device)
    n = max(1, len(truth))
    return {k: int((p == truth).sum()) / n for k, p in preds.items()}


@register_task(
    "knn",
    settings=KNNSettings,
    label="IN1k-KNN",
    help="k-NN top-1 on the cls token (IN1k-KNN); DATA has train/<class>/ and val/<class>/",
    example="protocol=paper k=[10,20] batch_size=128",
)
def knn(
    model: Any,
    data: str | os.PathLike | tuple[ClassFolder, ClassFolder],
    weights: str | None = None,
    output_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> EvalResult:
    """kNN top-1 accuracy of `model`'s cls token; `data` is a root with train/ and val/ trees.

    `value` is top-1 at k = 10 (the first k when 10 is not among `k`); `extra.top1_by_k` has every k.
    """
    if isinstance(overrides.get("k"), int):
        overrides["k"] = [overrides["k"]]
    s = resolve_settings(KNNSettings, overrides)
    m = load_model(model, weights, s.device)
    if isinstance(data, tuple):
        train, val = data
        dataset_name = str(train.root.parent)
    else:
        train, val = class_folder_splits(data, s.train_split, s.val_split)
        dataset_name = str(Path(data))
    tf = classification_transform(m, s.resolution, s.resize)
    tr_f, tr_y = extract_cls(m, train, tf, s.batch_size, s.num_workers, "knn train features")
    va_f, va_y = extract_cls(m, val, tf, s.batch_size, s.num_workers, "knn val features")
    accs = knn_accuracy(
        tr_f, tr_y, va_f, va_y, s.k, len(train.classes), s.protocol, s.temperature, s.chunk_size
    )
    first = MAIN_K if MAIN_K in s.k else s.k[0]
    result = EvalResult(
        task="knn",
        metric=f"top1@k={first}",
        value=accs[first],
        model=m.name,
        dataset=dataset_name,
        settings=settings_dict(s),
        extra={
            "top1_by_k": {str(k): v for k, v in accs.items()},
            "protocol": s.protocol,
            "k_effective": {str(k): min(k, len(train)) for k in s.k},  # k > train size uses them all
            "num_train": len(train),
            "num_val": len(val),
            "num_classes": len(train.classes),
            "model_info": m.describe(),
        },
    )
    if output_dir is not None:
        result.write(output_dir)
    return result
