"""LLaVA's `group_by_modality_length` (eupe.vlm.sampler): one modality per batch, less padding, and
the same order on every rank."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")

from accelerate.data_loader import BatchSamplerShard  # noqa: E402
from torch.utils.data import BatchSampler, RandomSampler  # noqa: E402

from eupe.vlm.sampler import ModalityLengthSampler, has_image, text_length  # noqa: E402

IMAGE_TOKENS = 576


def _mix(n_image: int, n_text: int, seed: int = 0) -> list[dict]:
    """Records shaped like stage B's mix: image questions of varied length, text-only chats of more."""
    rng = random.Random(seed)

    def record(image: bool, chars: int) -> dict:
        turns = [{"from": "human", "value": "<image>\n" * image + "q" * chars}, {"from": "gpt", "value": "a"}]
        return {"id": str(rng.random()), **({"image": "x.jpg"} if image else {}), "conversations": turns}

    records = [record(True, rng.randint(10, 600)) for _ in range(n_image)]
    records += [record(False, rng.randint(10, 2000)) for _ in range(n_text)]
    rng.shuffle(records)
    return records


def _tokens(record: dict) -> int:
    return text_length(record) + IMAGE_TOKENS * has_image(record)


def _shares(sampler, batch: int, ranks: int) -> list[list[list[int]]]:
    """Each rank's batches as the Trainer's loader deals them (accelerate's BatchSamplerShard)."""
    return [list(BatchSamplerShard(BatchSampler(sampler, batch, False), ranks, r)) for r in range(ranks)]


def _padding(records: list[dict], batches: list[list[int]]) -> float:
    """The share of a padded batch's tokens that are padding, over all batches."""
    sizes = [[_tokens(records[i]) for i in b] for b in batches]
    return 1 - sum(map(sum, sizes)) / sum(max(s) * len(s) for s in sizes)


def test_batches_hold_one_modality_and_far_less_padding_on_every_rank():
    records = _mix(n_image=408, n_text=136)  # remainders 408 % 16 = 8, 136 % 16 = 8: whole batches
    batch, ranks, accum = 4, 2, 2
    # each rank builds its own sampler, as each torchrun process does
    shares = [
        _shares(ModalityLengthSampler(records, batch * accum * ranks, seed=7), batch, ranks)[r]
        for r in (0, 1)
    ]
    batches = [b for step in zip(*shares) for b in step]
    assert sorted(i for b in batches for i in b) == list(range(len(records)))  # each record once
    assert all(len({has_image(records[i]) for i in b}) == 1 for b in batches)
    random_order = _shares(RandomSampler(records, generator=torch.Generator().manual_seed(7)), batch, ranks)
    grouped, drawn = _padding(records, batches), _padding(records, [b for s in random_order for b in s])
    assert grouped < drawn / 3, (grouped, drawn)


def test_at_most_one_batch_mixes_the_modalities_and_the_order_follows_seed_and_epoch():
    records = _mix(n_image=203, n_text=61)
    sampler = ModalityLengthSampler(records, group=16, seed=0)
    first = list(sampler)
    mixed = [b for b in BatchSampler(first, 4, False) if len({has_image(records[i]) for i in b}) > 1]
    assert len(mixed) <= 1 and sorted(first) == list(range(len(records)))
    assert list(ModalityLengthSampler(records, group=16, seed=0)) == first  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(ModalityLengthSampler(records, group=16, seed=1)) != first


def test_the_trainer_draws_from_the_grouped_sampler_and_tells_it_the_epoch(tmp_path):
    from transformers import TrainingArguments

    from eupe.vlm.train import LlavaTrainer

    sampler = ModalityLengthSampler(_mix(40, 24), group=8, seed=3)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", use_cpu=True
    )
    trainer = LlavaTrainer(
        model=torch.nn.Linear(1, 1),
        args=args,
        train_dataset=list(range(64)),
        data_collator=torch.tensor,
        sampler=sampler,
    )
    assert [i for b in trainer.get_train_dataloader() for i in b.tolist()] == list(sampler)
    trainer.state.epoch = 2.5  # as a run resumed mid-way through its third epoch
    trainer.callback_handler.on_epoch_begin(args, trainer.state, trainer.control)
    assert sampler.epoch == 2


def test_stage_b_groups_by_modality_length_by_default_and_stage_a_does_not():
    from pathlib import Path

    from eupe.vlm.train import VlmConfig, load_vlm_config

    cfg = VlmConfig()
    assert cfg.stage_b.group_by_modality_length and not cfg.stage_a.group_by_modality_length
    folder = Path(__file__).resolve().parents[1] / "configs" / "vlm"
    assert load_vlm_config(folder / "llava15_stage_b.yaml", ["init=x"]).stage_b.group_by_modality_length
    assert not load_vlm_config(folder / "llava15_stage_a.yaml").stage_a.group_by_modality_length
