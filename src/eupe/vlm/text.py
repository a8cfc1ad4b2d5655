"""Tokenizers and LLaVA-1.5's two conversation formats, turned into token ids and training labels.

Stage A uses LLaVA's `plain` format: the image, then the caption (the only supervised text).
Stage B and evaluation use `vicuna_v1`: a system line, then `USER: ... ASSISTANT: ...</s>` rounds;
only the assistant's replies (with their end-of-sequence token) are supervised. A sample's
`<image>` placeholder becomes as many image tokens as the encoder gives patch tokens (576 at the
paper's settings), which the model replaces by the projected patch features.

A record that does not fit the format raises `BadSample` with a short reason; the data loader
skips it and counts the reason (a bad record never stops an epoch).
"""

from __future__ import annotations

from typing import Any

IMAGE = "<image>"
IGNORE = -100  # label of a token that is not supervised
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
STYLES = ("plain", "vicuna_v1")
# the same prompt as a chat template, so that a saved processor formats conversations like training did
CHAT_TEMPLATE = (
    "{{ '" + SYSTEM + "' }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ ' USER: ' + m['content'] }}"
    "{% else %}{{ ' ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


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


def chat_prompt(question: str, image: bool = True) -> str:
    """The `vicuna_v1` prompt for one question, ending where the assistant's answer starts."""
    if image and IMAGE not in question:
        question = f"{IMAGE}\n{question}"
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


def encode(
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    style: str,
    image_tokens: int,
    image_token_id: int,
    max_length: int,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; the `<image>` text becomes `image_tokens` ids."""
    pieces: list[tuple[str, bool]] = []  # (text, supervised)
    if style == "plain":
        pieces = [(IMAGE, False), (pairs[0][1] + "\n", True)]
    elif style == "vicuna_v1":
        pieces = [(SYSTEM + " ", False)]
        for human, gpt in pairs:
            pieces += [(f"USER: {human} ASSISTANT: ", False), (gpt, True)]
    else:
        raise ValueError(f"unknown conversation style {style!r}; choose from {', '.join(STYLES)}")
    ids, labels = [tokenizer.bos_token_id], [IGNORE]
    for text, supervised in pieces:
        chunk: list[int] = []
        for k, part in enumerate(text.split(IMAGE)):
            if k:
                chunk += [image_token_id] * image_tokens
            if part:
                chunk += tokenizer(part, add_special_tokens=False)["input_ids"]
        if supervised and style == "vicuna_v1":
            chunk.append(tokenizer.eos_token_id)
        ids += chunk
        labels += chunk if supervised else [IGNORE] * len(chunk)
    if len(ids) > max_length:  # LLaVA truncates; a cut through the image or every answer is a skip
        ids, labels = ids[:max_length], labels[:max_length]
        if ids.count(image_token_id) % max(image_tokens, 1) or all(x == IGNORE for x in labels):
            raise BadSample("too long")
    return ids, labels
