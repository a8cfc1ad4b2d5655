"""Tokenizers and LLaVA-1.5's two conversation formats, turned into token ids and training labels.

Stage A uses LLaVA's `plain` format: the image, then the caption (the only supervised text).
Stage B and evaluation use `vicuna_v1`: a system line, then `USER: ... ASSISTANT: ...</s>` rounds;
only the assistant's replies (with their end-of-sequence token) are supervised. A turn holding the
image starts with `<image>` and a newline, wherever the record put it (LLaVA's `preprocess_multimodal`).

A conversation is tokenized as one text, exactly as the evaluation prompt is (`chat_prompt`, through
the same tokenizer): tokenizing it piece by piece gives other ids at the seams (`:` `Ġ` `blue`
instead of `:` `Ġblue`), and adding a BOS by hand gives a token the tokenizer never adds (SmolLM2).
The labels come from character offsets: a token is supervised when it starts inside an answer. A
sample's `<image>` token then becomes as many image tokens as the encoder gives patch tokens (576 at
the paper's settings), which the model replaces by the projected patch features, as the processor
does at evaluation.

A record that does not fit the format raises `BadSample` with a short reason; the data loader
skips it and counts the reason (a bad record never stops an epoch).
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ConfigError

IMAGE = "<image>"
IGNORE = -100  # label of a token that is not supervised
# LLaVA-1.5's system prompt, `conv_vicuna_v1`: its training (`--version v1`) and its evaluation
# (`--conv-mode vicuna_v1`) both use it. LLaVA-1.0's `conv_llava_v1` says "human" for "user".
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
STYLES = ("plain", "vicuna_v1")


def chat_template(system: str = SYSTEM) -> str:
    """`chat_prompt` as a chat template, so that a saved processor formats conversations as training did.

    The system text goes in as a JSON string, which is a valid Jinja literal whatever quotes,
    backslashes or braces it holds. A message's content is a string or a list of parts
    (`{"type": "image"}`, `{"type": "text", "text": ...}`); a turn holding one image is laid out as
    `image_first` does.
    """
    return (
        "{{ " + json.dumps(system + " ", ensure_ascii=False) + " }}"
        "{% for m in messages %}{% set c = m['content'] %}"
        "{% if c is string %}{% set text, images = c, 0 %}{% else %}"
        "{% set text = c | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
        "{% set images = c | selectattr('type', 'equalto', 'image') | list | length %}{% endif %}"
        "{% set image = " + json.dumps(IMAGE) + " %}{% set text = (image + '\\n') * images + text %}"
        "{% if text.count(image) == 1 %}"
        "{% set text = (image + '\\n' + (text.replace(image, '') | trim)) | trim %}{% endif %}"
        "{% if m['role'] == 'user' %}{{ 'USER: ' + text + ' ' }}"
        "{% elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + text + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )


CHAT_TEMPLATE = chat_template()


class BadSample(ValueError):
    """A record the loader skips; the message is the reason it is counted under."""


def byte_tokenizer() -> Any:
    """A byte-level tokenizer built here (no download): 256 bytes plus <unk> <s> </s> <pad> <image>.

    For tiny configs and tests; real runs use the language model's own tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE},
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give `tokenizer` what LLaVA needs: an `<image>` special token, a pad token, the chat template."""
    if IMAGE not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
    if tokenizer.pad_token is None:  # LLaVA-1.5 pads Vicuna with <unk>
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def sentencepiece_compat() -> None:
    """Let transformers read a tokenizer shipped as `tokenizer.model` alone (Vicuna, Llama-2).

    transformers parses that SentencePiece file with sentencepiece's generated protobuf module, and
    sentencepiece 0.2.3 generated it for protobuf 7, while lmms-eval 0.7.3 pins wandb 0.25.0, which
    needs protobuf < 7: the import fails, transformers falls back to a tiktoken reader that cannot
    parse the file, and the tokenizer does not load. transformers ships its own generated module of
    the same `sentencepiece_model.proto`, which runs on protobuf 4 to 6. Where sentencepiece's module
    does not import, transformers' is registered under its name, so transformers' own, unchanged
    conversion reads the file. Nothing changes where sentencepiece's module imports.
    """
    import importlib
    import sys

    name = "sentencepiece.sentencepiece_model_pb2"
    try:
        importlib.import_module(name)
    except ImportError:  # no sentencepiece: transformers uses its own module anyway
        pass
    except Exception:  # protobuf's VersionError: generated for a newer protobuf than the one installed
        sys.modules[name] = importlib.import_module("transformers.utils.sentencepiece_model_pb2_new")


def image_first(text: str) -> str:
    """A turn holding the image, laid out as LLaVA-1.5's `preprocess_multimodal` does it.

    `<image>` is taken out, the rest stripped and put after `<image>` and a newline (a turn that is
    only `<image>` stays without the newline). LLaVA does this to its instruction data, where some
    turns hold the image in mid-text or at the end, so training and its prompts see one layout.
    """
    return f"{IMAGE}\n{text.replace(IMAGE, '').strip()}".strip()


def chat_prompt(question: str, image: bool = True) -> str:
    """The `vicuna_v1` prompt for one question, ending where the assistant's answer starts.

    With an image, the question is laid out as training lays out a turn holding it (`image_first`);
    a question already holding several `<image>` (several images) is kept as it is.
    """
    if image and question.count(IMAGE) <= 1:
        question = image_first(question)
    return f"{SYSTEM} USER: {question} ASSISTANT:"


def check_turns(record: Any, style: str) -> list[tuple[str, str]]:
    """(human, assistant) pairs of a LLaVA JSON record, or `BadSample` saying what is wrong."""
    if not isinstance(record, dict):
        raise BadSample("malformed conversation")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise BadSample("malformed conversation")
    pairs = []
    for human, gpt in zip(turns[::2], turns[1::2]):
        ok = all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in (human, gpt))
        if not ok or human.get("from") != "human" or gpt.get("from") != "gpt":
            raise BadSample("malformed conversation")
        pairs.append((human["value"], gpt["value"]))
    n_images = sum(h.count(IMAGE) + g.count(IMAGE) for h, g in pairs)
    if n_images != (1 if record.get("image") else 0) or IMAGE in "".join(g for _, g in pairs):
        raise BadSample("malformed conversation")
    if style == "plain" and len(pairs) != 1:
        raise BadSample("malformed conversation")
    return pairs


def conversation(pairs: list[tuple[str, str]], style: str, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """One conversation as LLaVA-1.5 writes it, and the character spans that are supervised.

    `vicuna_v1`: `SYSTEM USER: q ASSISTANT: a</s>USER: ...`, `eos` standing for `</s>`; an answer's
    span starts at the space after `ASSISTANT:`, which tokenizers fold into the answer's first token.
    `plain`: `<image>`, then the caption and a newline (supervised).
    """
    if style == "plain":
        return f"{IMAGE}{pairs[0][1]}\n", [(len(IMAGE), len(IMAGE) + len(pairs[0][1]) + 1)]
    if style != "vicuna_v1":
        raise ValueError(f"unknown conversation style {style!r}; choose from {', '.join(STYLES)}")
    text, spans = f"{SYSTEM} ", []
    for human, gpt in pairs:
        text += f"USER: {image_first(human) if IMAGE in human else human} ASSISTANT:"
        spans.append((len(text), len(text) + len(gpt) + len(eos) + 1))
        text += f" {gpt}{eos}"
    return text, spans


def encode(
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    style: str,
    image_tokens: int,
    image_token_id: int,
    max_length: int,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; the `<image>` token becomes `image_tokens` ids.

    The text is tokenized whole, with the tokenizer's own special tokens (a BOS where it adds one),
    so the ids before the first answer are those of `chat_prompt` for the first question. A token
    that crosses from a prompt into an answer would break that; it is refused as a `ConfigError`.
    """
    text, spans = conversation(pairs, style, tokenizer.eos_token)
    enc = tokenizer(text, return_offsets_mapping=True)
    if any(s < b < e for s, e in enc["offset_mapping"] for span in spans for b in span):
        raise ConfigError(
            f"{type(tokenizer).__name__} merges a prompt's last characters into the answer, so training "
            "would not see the evaluation prompt's ids"
        )
    if enc["input_ids"].count(image_token_id) != text.count(IMAGE):
        raise ConfigError(f"the tokenizer does not read {IMAGE} as one token of id {image_token_id}")
    ids: list[int] = []
    labels: list[int] = []
    for i, (s, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        n = image_tokens if i == image_token_id else 1
        ids += [i] * n
        labels += [i if any(a <= s < b for a, b in spans) and n == 1 else IGNORE] * n
    if len(ids) > max_length:  # LLaVA truncates; a cut through the image or every answer is a skip
        ids, labels = ids[:max_length], labels[:max_length]
        if ids.count(image_token_id) % max(image_tokens, 1) or all(x == IGNORE for x in labels):
            raise BadSample("too long")
    return ids, labels
