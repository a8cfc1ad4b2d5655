"""k-nearest-neighbour classification on the cls token (IN1k-KNN, paper section 8.1).

Protocol: resize 256, center crop 224, cls token, L2-normalized; the train set is the bank; each
val image takes the majority label of its k most similar train images (ties go to the class with
the larger summed similarity); top-1 accuracy. Similarities are computed in chunks with a running
top-k, so the bank never has to fit in one [val x train] matrix.
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


@dataclass
class KNNSettings:
    k: list[int] = field(default_factory=lambda: [10])
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
    queries: torch.Tensor, bank: torch.Tensor, k: int, chunk_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k dot products of each query against the bank, one bank chunk at a time.

    Returns (similarities [Q, k'], bank indices [Q, k']) sorted descending, k' = min(k, len(bank)).
    """
    k = min(k, bank.shape[0])
    best_s = torch.full((queries.shape[0], 0), float("-inf"), device=queries.device)
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[0], chunk_size):
        sims = queries @ bank[start : start + chunk_size].T
        idx = torch.arange(start, start + sims.shape[1], device=queries.device).expand_as(sims)
        s, pos = torch.cat([best_s, sims], 1).topk(min(k, best_s.shape[1] + sims.shape[1]), dim=1)
        best_i = torch.cat([best_i, idx], 1).gather(1, pos)
        best_s = s
    return best_s, best_i


def knn_vote(sims: torch.Tensor, labels: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """Majority label among the first k neighbours; ties go to the larger summed similarity."""
    sims, labels = sims[:, :k], labels[:, :k]
    votes = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=torch.float64)
    votes.scatter_add_(1, labels, torch.ones_like(sims, dtype=torch.float64))
    tie = torch.zeros_like(votes).scatter_add_(1, labels, sims.double())
    # |summed similarity| <= k, so scaling by 1/(4k) keeps it below one vote
    return (votes + tie / (4 * k)).argmax(1)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    ks: list[int],
    num_classes: int,
    chunk_size: int = 8192,
    query_chunk: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy for every k in `ks` on L2-normalized features."""
    bank = F.normalize(train_feats.float(), dim=1)
    queries = F.normalize(val_feats.float(), dim=1)
    correct = {k: 0 for k in ks}
    for start in range(0, len(queries), query_chunk):
        q = queries[start : start + query_chunk]
        s, i = running_topk(q, bank, max(ks), chunk_size)
        nb_labels = train_labels[i]
        truth = val_labels[start : start + query_chunk]
        for k in ks:
            correct[k] += int((knn_vote(s, nb_labels, k, num_classes) == truth).sum())
    return {k: correct[k] / len(queries) for k in ks}


def knn(
    model: Any,
    data: str | os.PathLike | tuple[ClassFolder, ClassFolder],
    weights: str | None = None,
    output_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> EvalResult:
    """kNN top-1 accuracy of `model`'s cls token; `data` is a root with train/ and val/ trees."""
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
    accs = knn_accuracy(tr_f, tr_y, va_f, va_y, s.k, len(train.classes), s.chunk_size)
    first = s.k[0]
    result = EvalResult(
        task="knn",
        metric=f"top1@k={first}",
        value=accs[first],
        model=m.name,
        dataset=dataset_name,
        settings=settings_dict(s),
        extra={
            "top1_by_k": {str(k): v for k, v in accs.items()},
            "num_train": len(train),
            "num_val": len(val),
            "num_classes": len(train.classes),
            "model_info": m.describe(),
        },
    )
    if output_dir is not None:
        result.write(output_dir)
    return result
