"""Offline stand-ins for the tokenizers of real language models (tests never download).

- `bpe_tokenizer()`: a byte-level BPE configured like SmolLM2's: ChatML specials, no BOS added,
  `bos_token` `<|im_start|>`, `eos_token` `<|im_end|>`, trained here with `tokenizers`.
- `sentencepiece_folder(folder)`: a Llama tokenizer as lmsys/vicuna-7b-v1.5 ships it, a SentencePiece
  `tokenizer.model` (BPE with byte fallback, trained here with `sentencepiece`) and its
  `tokenizer_config.json`, nothing else; `load_tokenizer(folder)` reads it as `eupe vlm train` does.

The tiny byte tokenizer of the tests (`byte_tokenizer`) gives the same ids whether a text is
tokenized whole or piece by piece; these two do not, as real tokenizers do not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eupe.vlm.text import SYSTEM, prepare_tokenizer

WORDS = "blue red white green circle square triangle bus shape colour picture answer question image".split()
CORPUS = [
    SYSTEM,
    *(f"USER: What is the {w} in the picture? ASSISTANT: {v} {w}." for w in WORDS for v in WORDS[:6]),
    "Answer the question using a single word or phrase.",
    "The bus is white and red. 12 + 30 = 42",
] * 4


def bpe_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return prepare_tokenizer(
        PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            unk_token="<|endoftext|>",
        )
    )


def sentencepiece_folder(folder: Path) -> Path:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": False,
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
