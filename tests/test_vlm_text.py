"""Conversations to token ids (eupe.vlm.text) with tokenizers like real language models' (issue 27).

The tiny byte tokenizer gives the same ids whichever way a text is cut, so the tests that tie
training's ids to the evaluation prompt's also run a SmolLM2-like byte-level BPE and a
SentencePiece Llama tokenizer loaded from `tokenizer.model` alone, as Vicuna ships it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from eupe.errors import ConfigError  # noqa: E402
from eupe.vlm.model import load_tokenizer, make_processor  # noqa: E402
from eupe.vlm.text import (  # noqa: E402
    IGNORE,
    IMAGE,
    SYSTEM,
    byte_tokenizer,
    chat_prompt,
    chat_template,
    check_turns,
    conversation,
    encode,
    image_first,
)

from .vlm_tokenizers import CORPUS, bpe_tokenizer, sentencepiece_folder  # noqa: E402

QUESTIONS = (
    "<image>\nWhat is the colour of the bus?",
    "What is the colour of the bus? <image>",  # LLaVA moves the image to the front
    "What is the <image> colour of the bus?",
)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = sentencepiece_folder(tmp_path_factory.mktemp("vicuna_like"))
    return {"byte": byte_tokenizer(), "bpe": bpe_tokenizer(), "sentencepiece": load_tokenizer(str(folder))}


def _expand(ids: list[int], image_id: int, n: int) -> list[int]:
    return [x for i in ids for x in ([i] * n if i == image_id else [i])]


@pytest.mark.parametrize("name", ["byte", "bpe", "sentencepiece"])
@pytest.mark.parametrize("question", QUESTIONS)
def test_training_ids_start_with_the_evaluation_prompts_ids(tokenizers, name, question):
    """Issue 27 defect 1: up to the first supervised token, training's ids are evaluation's."""
    from PIL import Image

    tok = tokenizers[name]
    image_id = tok.convert_tokens_to_ids(IMAGE)
    pairs = [(question, "blue"), ("And its shape?", "a white square")]
    ids, labels = encode(tok, pairs, "vicuna_v1", image_tokens=4, image_token_id=image_id, max_length=4096)
    first = next(k for k, x in enumerate(labels) if x != IGNORE)
    assert ids[:first] == _expand(tok(chat_prompt(question)).input_ids, image_id, 4)
    # what evaluation feeds the model: the processor of a saved model (16 px patches of 32 px: 4 tokens)
    image = Image.new("RGB", (32, 32))
    served = make_processor(tok, 32, 16)(text=chat_prompt(question), images=[image]).input_ids[0]
    assert ids[:first] == list(served)
    supervised = [i for i, x in zip(ids, labels) if x != IGNORE]
    assert supervised[-1] == tok.eos_token_id and supervised.count(tok.eos_token_id) == 2
    eos = tok.eos_token
    assert tok.decode(supervised).strip() == f"blue{eos} a white square{eos}"
    # the whole conversation, tokenized as one text
    text, _ = conversation(pairs, "vicuna_v1", eos)
    assert ids == _expand(tok(text).input_ids, image_id, 4)
    assert len(ids) == len(labels) and ids.count(image_id) == 4


def test_real_tokenizers_join_the_answer_to_the_separator_and_add_their_own_bos(tokenizers):
    """The ids the issue quotes: `:` then `Ġblue` / `▁blue`, no lone space token, the tokenizer's BOS."""
    for name, colon_blue, start in (
        ("bpe", [":", "Ġblue"], "A"),  # SmolLM2 adds no BOS; its bos_token is <|im_start|>
        ("sentencepiece", [":", "▁blue"], "<s>"),
    ):
        tok = tokenizers[name]
        image_id = tok.convert_tokens_to_ids(IMAGE)
        ids, labels = encode(tok, [(QUESTIONS[0], "blue")], "vicuna_v1", 1, image_id, 4096)
        first = next(k for k, x in enumerate(labels) if x != IGNORE)
        assert tok.convert_ids_to_tokens(ids[first - 1 : first + 1]) == colon_blue
        assert tok.convert_ids_to_tokens(ids[:1]) == [start]
        assert ids.count(tok.bos_token_id) == (name == "sentencepiece")


def test_plain_style_supervises_the_caption_and_its_newline(tokenizers):
    for tok in tokenizers.values():
        image_id = tok.convert_tokens_to_ids(IMAGE)
        ids, labels = encode(tok, [("<image>\nDescribe.", "a red circle.")], "plain", 3, image_id, 4096)
        assert ids.count(image_id) == 3
        assert tok.decode([i for i, x in zip(ids, labels) if x != IGNORE]).strip(" ") == "a red circle.\n"


def test_a_tokenizer_that_merges_across_the_answer_boundary_is_refused():
    """A BPE that does not split words first learns `ASSISTANT: blue` as one token: refused, not mislabelled."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>", IMAGE], show_progress=False)
    raw.train_from_iterator([SYSTEM, "USER: Colour? ASSISTANT: blue"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    with pytest.raises(ConfigError, match="merges"):
        encode(tok, [("<image>\nColour?", "blue")], "vicuna_v1", 1, tok.convert_tokens_to_ids(IMAGE), 4096)


def test_the_image_goes_to_the_front_of_its_turn_as_in_llava():
    """Issue 27 defect 4: LLaVA-1.5's preprocess_multimodal, in training and in the eval prompt."""
    assert image_first("What is this? <image>") == "<image>\nWhat is this?"
    assert image_first("What is <image> this?\n") == "<image>\nWhat is  this?"
    assert image_first("  <image>\n Colour?  ") == "<image>\nColour?"
    assert image_first("<image>") == "<image>"
    record = {
        "image": "x.png",
        "conversations": [
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Red"},
            {"from": "human", "value": "And the shape?\n<image>"},
            {"from": "gpt", "value": "A circle"},
        ],
    }
    text, _ = conversation(check_turns(record, "vicuna_v1"), "vicuna_v1", "</s>")
    assert text.endswith("Red</s>USER: <image>\nAnd the shape? ASSISTANT: A circle</s>")
    assert chat_prompt("What is this? <image>") == chat_prompt("<image>\nWhat is this?")
    assert chat_prompt("What is this?").endswith("USER: <image>\nWhat is this? ASSISTANT:")
    two = "<image>\n<image>\nWhich is larger?"  # several images: kept as they are
    assert chat_prompt(two).endswith(f"USER: {two} ASSISTANT:")
    assert chat_prompt("What is 2+2?", image=False).endswith("USER: What is 2+2? ASSISTANT:")


def test_the_system_prompt_is_llava_15s():
    """Issue 27 defect 8: conv_vicuna_v1 (LLaVA-1.5's --version v1 / --conv-mode vicuna_v1)."""
    assert SYSTEM == (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    assert chat_prompt("Hi?", image=False) == f"{SYSTEM} USER: Hi? ASSISTANT:"


def test_the_chat_template_takes_any_system_text_and_writes_what_training_tokenizes(tokenizers):
    """Issue 27 defect 2: the template is valid whatever the system text holds."""
    tok = byte_tokenizer()
    pairs = [("Colour? <image>", "Red"), ("Shape?", "circle")]
    messages = [{"role": r, "content": c} for q, a in pairs for r, c in (("user", q), ("assistant", a))]
    assert tok.apply_chat_template(messages, tokenize=False) == conversation(pairs, "vicuna_v1", "</s>")[0]
    odd = 'It\'s "quoted", a \\ backslash, {{ braces }}, {% tags %}, é and 😀.'
    got = tok.apply_chat_template(
        messages[:1], tokenize=False, add_generation_prompt=True, chat_template=chat_template(odd)
    )
    assert got == f"{odd} USER: <image>\nColour? ASSISTANT:"


def test_a_sentencepiece_tokenizer_model_alone_loads_and_matches_sentencepiece(tmp_path, tokenizers):
    """Issue 27 defect 7: Vicuna's tokenizer.model loads in the [vlm] environment (protobuf < 7).

    transformers reads it with sentencepiece's protobuf module, generated for protobuf 7 in
    sentencepiece 0.2.3, where lmms-eval's wandb pin keeps protobuf below 7; `load_tokenizer` makes
    transformers use its own module of the same proto instead (`sentencepiece_compat`).
    """
    import sentencepiece as spm
    from transformers import AutoProcessor

    folder = sentencepiece_folder(tmp_path / "vicuna_like")
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    tok = load_tokenizer(str(folder))
    assert type(tok).__name__ == "LlamaTokenizer"
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in (*CORPUS[:30], "Grüße, 😀 and 2024."):
        assert tok(text).input_ids == [sp.bos_id(), *sp.encode(text)], text
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<unk>")
    # a saved processor carries tokenizer.json: reading it back needs no SentencePiece file
    make_processor(tok, 32, 16).save_pretrained(tmp_path / "final")
    assert not (tmp_path / "final" / "tokenizer.model").exists()
    again = AutoProcessor.from_pretrained(tmp_path / "final").tokenizer
    assert again(chat_prompt("Colour?")).input_ids == tok(chat_prompt("Colour?")).input_ids
