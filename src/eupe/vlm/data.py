"""LLaVA's training data: a JSON list of conversations plus an image folder, batched for the Trainer.

The format is LLaVA-1.5's own (`blip_laion_cc_sbu_558k.json` for stage A,
`llava_v1_5_mix665k.json` for stage B):

    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."}, ...]}, ...]

A record without "image" is text-only. Images are padded to a square with the mean colour and
resized by the processor. A record that cannot be used (missing or unreadable image, malformed
conversation, too long to keep its image and an answer) is skipped and counted by reason; the
counts travel with the batch (`skipped`) so the trainer can log them and keep them across resumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError
from .model import square
from .text import IGNORE, BadSample, check_turns, encode

REASONS = ("missing image", "unreadable image", "malformed conversation", "too long")


def read_records(path: str | Path) -> list[Any]:
    """The records of a LLaVA JSON (a list) or JSON-lines file; a broken file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: the conversation file does not exist")
    try:
        if path.suffix == ".jsonl":
            with path.open() as f:
                records = [json.loads(line) for line in f if line.strip()]
        else:
            records = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(records, list) or not records:
        raise ConfigError(f"{path}: expected a non-empty JSON list of conversations (LLaVA format)")
    return records


class ConversationData(torch.utils.data.Dataset):
    """One LLaVA record per item: input_ids, labels and pixel_values, or `{"skip": reason}`."""

    def __init__(
        self,
        records: list[Any],
        image_folder: str | Path,
        processor: Any,
        style: str,
        image_tokens: int,
        image_token_id: int,
        max_length: int,
    ):
        self.records = records
        self.image_folder = Path(image_folder)
        self.processor = processor
        self.style = style
        self.image_tokens = image_tokens
        self.image_token_id = image_token_id
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        return self.processor.image_processor(images=[square(image)], return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        try:
            pairs = check_turns(record, self.style)
            ids, labels = encode(
                self.processor.tokenizer,
                pairs,
                self.style,
                self.image_tokens,
                self.image_token_id,
                self.max_length,
            )
            item: dict[str, Any] = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
            if record.get("image"):
                path = self.image_folder / str(record["image"])
                if not path.is_file():
                    raise BadSample("missing image")
                try:
                    with Image.open(path) as im:
                        item["pixel_values"] = self.pixels(im)
                except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
                    raise BadSample("unreadable image") from None
            return item
        except BadSample as e:
            return {"skip": str(e)}


class Collate:
    """Pads a batch (right side), stacks its images, counts its skipped records.

    A batch whose records were all skipped becomes one placeholder sample with no supervised
    token (a blank image and its image tokens), so every rank still runs the same forward pass.
    """

    def __init__(self, pad_id: int, image_token_id: int, image_tokens: int, image_size: int):
        self.pad_id = pad_id
        self.placeholder = {  # image tokens only: not every tokenizer has a BOS token (SmolLM2's adds none)
            "input_ids": torch.full((image_tokens,), image_token_id),
            "labels": torch.full((image_tokens,), IGNORE),
            "pixel_values": torch.zeros(3, image_size, image_size),
        }

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        skipped = torch.zeros(len(REASONS), dtype=torch.long)
        for it in items:
            if "skip" in it:
                skipped[REASONS.index(it["skip"])] += 1
        good = [it for it in items if "skip" not in it] or [self.placeholder]
        n = max(len(it["input_ids"]) for it in good)
        ids = torch.full((len(good), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(good), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(good), n), dtype=torch.long)
        for k, it in enumerate(good):
            m = len(it["input_ids"])
            ids[k, :m], labels[k, :m], mask[k, :m] = it["input_ids"], it["labels"], 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "skipped": skipped}
        images = [it["pixel_values"] for it in good if "pixel_values" in it]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch
