"""LLaVA-1.5's `group_by_modality_length`: each batch holds one modality, at similar lengths.

The collator pads a batch to its longest record, and stage B's mix holds records with an image
(576 image tokens plus the text) beside text-only ones of a few to a few thousand tokens: drawn at
random, most of a batch's tokens can be padding. The order here follows LLaVA's trainer:

1. the records with an image and those without are shuffled apart and cut into megabatches of one
   optimizer step's records (batch size x gradient accumulation x ranks);
2. each megabatch is sorted longest first, so its batches hold neighbouring lengths;
3. the megabatches of both modalities are shuffled together; the two remainders go last, one after
   the other, so at most one batch per epoch mixes the modalities.

Unlike LLaVA, a megabatch is cut into consecutive batches (least padding) rather than dealt out for
equal token sums per rank; a step waits for its longest batch either way. The order is one list
drawn from the seed and the epoch alone, the same on every rank; the Trainer's loader (accelerate's
batch sharding) deals its batches round-robin, batch k to rank k mod world size, so each rank's
share is fixed and a resumed run skips exactly the batches it consumed. A record's length is its
text's characters, as LLaVA counts words, without tokenising 665K records at start-up: within a
modality the image tokens are the same for every record, so the text alone orders them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def has_image(record: Any) -> bool:
    return isinstance(record, dict) and bool(record.get("image"))


def text_length(record: Any) -> int:
    """Characters of a record's turns; 0 for a malformed record (it will be skipped anyway)."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return 0
    return sum(len(str(t.get("value", ""))) for t in turns if isinstance(t, dict))


class ModalityLengthSampler(torch.utils.data.Sampler[int]):
    """All records' indices, grouped by modality and length (module docstring); `group` is the
    number of records in one optimizer step over all ranks."""

    def __init__(self, records: list[Any], group: int, seed: int):
        self.lengths = [text_length(r) for r in records]
        self.images = [has_image(r) for r in records]
        self.group, self.seed, self.epoch = group, seed, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _longest_first(self, indices: list[int]) -> list[int]:
        return sorted(indices, key=self.lengths.__getitem__, reverse=True)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        megabatches, rests = [], []
        for image in (True, False):
            own = [i for i, m in enumerate(self.images) if m is image]
            own = [own[k] for k in torch.randperm(len(own), generator=g).tolist()]
            cut = len(own) - len(own) % self.group
            megabatches += [self._longest_first(own[s : s + self.group]) for s in range(0, cut, self.group)]
            rests += self._longest_first(own[cut:])
        order = torch.randperm(len(megabatches), generator=g).tolist()
        return iter([i for k in order for i in megabatches[k]] + rests)
