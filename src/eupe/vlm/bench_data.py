"""Small synthetic benchmark sets in each benchmark's own record layout, for offline runs and tests.

`write_benchmark_data(out_dir, tasks)` writes one `datasets` folder per task (`save_to_disk` of a
`DatasetDict` holding the split lmms-eval evaluates), which is what `run_vlm_eval(data_dir=...)`
reads. The columns, their types and the split names are those of the Hub sets lmms-eval loads
(lmms-lab TextVQA, ScienceQA ScienceQA-IMG, RealWorldQA, POPE, GQA testdev_balanced_*, MME), so a
folder made from the real sets (`load_dataset(...).save_to_disk(...)`) is read the same way:

    data_dir/textvqa_val/    split validation   data_dir/pope/   split test
    data_dir/scienceqa_img/  split test         data_dir/gqa/    split testdev (instructions)
    data_dir/realworldqa/    split test         data_dir/gqa_images/  split testdev (id, image)
    data_dir/mme/            split test

Images are drawn with numpy/PIL (coloured rectangles, or a word for TextVQA), not square, so the
square padding is exercised. Every record's reference answer is unambiguous, so a model that
answers it scores perfectly: all 10 TextVQA answers agree, MME comes in (yes, no) pairs per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError

try:
    import datasets
except ImportError:
    raise ConfigError("the VLM benchmarks need datasets: pip install 'eupe[vlm]'") from None

# the split lmms-eval evaluates, per task (its yaml's test_split / validation_split)
SPLITS = {
    "textvqa_val": "validation",
    "scienceqa_img": "test",
    "realworldqa": "test",
    "pope": "test",
    "gqa": "testdev",
    "mme": "test",
}
GQA_IMAGES = "gqa_images"  # the Hub's second GQA config (testdev_balanced_images), saved beside gqa/
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
WORDS = ("stop", "exit", "cafe", "open", "taxi", "bank", "hotel", "sale")
# MME categories in the order pairs are written: perception first (a 2-record run still has one)
MME_CATEGORIES = ("existence", "count", "commonsense_reasoning", "position", "color")
POPE_OBJECTS = ("car", "dog", "chair", "cup", "bottle", "person")


S = datasets.Value("string")
STRINGS = datasets.Sequence(S)
IMAGE = datasets.Image()
TEXTVQA_FEATURES = {
    "image_id": S,
    "question_id": datasets.Value("int64"),
    "question": S,
    "question_tokens": STRINGS,
    "image": IMAGE,
    "image_width": datasets.Value("int64"),
    "image_height": datasets.Value("int64"),
    "flickr_original_url": S,
    "flickr_300k_url": S,
    "answers": STRINGS,
    "image_classes": STRINGS,
    "set_name": S,
    "ocr_tokens": STRINGS,
}
SCIENCEQA_FEATURES = {"image": IMAGE, "question": S, "choices": STRINGS, "answer": datasets.Value("int8")}
SCIENCEQA_FEATURES.update(
    {k: S for k in ("hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")}
)
REALWORLDQA_FEATURES = {"image": IMAGE, "question": S, "answer": S}
POPE_FEATURES = {k: S for k in ("id", "question_id", "question", "answer", "image_source")}
POPE_FEATURES.update(image=IMAGE, category=S)
GQA_FEATURES = {k: S for k in ("id", "imageId", "question", "answer", "fullAnswer")}
GQA_FEATURES.update(
    isBalanced=datasets.Value("bool"),
    types={k: S for k in ("structural", "semantic", "detailed")},
    semanticStr=S,
)
GQA_IMAGE_FEATURES = {"id": S, "image": IMAGE}
MME_FEATURES = {"question_id": S, "image": IMAGE, "question": S, "answer": S, "category": S}


def picture(rng: np.random.Generator, colour: str, count: int = 1, word: str | None = None) -> Image.Image:
    """A noisy background with `count` rectangles of `colour` (and `word` written on it)."""
    w, h = int(rng.integers(72, 112)), int(rng.integers(48, 72))
    noise = rng.integers(90, 160, size=(h, w, 3), dtype=np.uint8)
    image = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(image)
    for k in range(count):
        x = 4 + k * (w - 8) // max(count, 1)
        draw.rectangle([x, h // 3, x + 10, h // 3 + 10], fill=COLOURS[colour])
    if word:
        draw.text((6, h - 16), word, fill=(255, 255, 255))
    return image


Rows = list[dict[str, Any]]


def _textvqa(rng: np.random.Generator, n: int) -> Rows:
    rows = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        image = picture(rng, "blue", word=word)
        rows.append(
            {
                "image_id": f"{i:016x}",
                "question_id": 34602 + i,
                "question": "what word is written on the sign?",
                "question_tokens": ["what", "word", "is", "written", "on", "the", "sign"],
                "image": image,
                "image_width": image.width,
                "image_height": image.height,
                "flickr_original_url": "",
                "flickr_300k_url": "",
                "answers": [word] * 10,  # all ten annotators agree: the right word scores 1.0
                "image_classes": ["Street sign"],
                "set_name": "val",
                "ocr_tokens": [word, "sign"],
            }
        )
    return rows


def _scienceqa(rng: np.random.Generator, n: int) -> Rows:
    names = list(COLOURS)
    rows = []
    for i in range(n):
        choices = names[: 2 + i % 3]
        answer = int(rng.integers(len(choices)))
        rows.append(
            {
                "image": picture(rng, choices[answer]),
                "question": "Which colour is the square?",
                "choices": choices,
                "answer": answer,  # index into choices; the task expects its letter
                "hint": "The picture shows one square." if i % 2 else "",
                "task": "closed choice",
                "grade": "grade3",
                "subject": "natural science",
                "topic": "physics",
                "category": "Colours",
                "skill": "Identify colours",
                "lecture": "",
                "solution": f"The square is {choices[answer]}.",
            }
        )
    return rows


def _realworldqa(rng: np.random.Generator, n: int) -> Rows:
    names = list(COLOURS)
    rows = []
    for i in range(n):
        if i % 2 == 0:  # multiple choice, answered with a letter
            k = int(rng.integers(3))
            options = "\n".join(f"{'ABC'[j]}. {names[j].capitalize()}" for j in range(3))
            question = (
                f"What colour is the square?\n\n{options}\n\n"
                "Please answer directly with only the letter of the correct option and nothing else."
            )
            rows.append({"image": picture(rng, names[k]), "question": question, "answer": "ABC"[k]})
        else:  # open-ended, answered with a number
            count = int(rng.integers(1, 4))
            question = "How many squares are there?\nPlease answer directly with a single word or number."
            rows.append(
                {"image": picture(rng, "red", count=count), "question": question, "answer": str(count)}
            )
    return rows


def _pope(rng: np.random.Generator, n: int) -> Rows:
    rows = []
    for i in range(n):
        rows.append(
            {
                "id": str(i),
                "question_id": str(i + 1),
                "question": f"Is there a {POPE_OBJECTS[i % len(POPE_OBJECTS)]} in the image?",
                "answer": "yes" if i % 2 == 0 else "no",
                "image_source": f"COCO_val2014_{i:012d}",
                "image": picture(rng, "green"),
                "category": ("adversarial", "popular", "random")[i % 3],
            }
        )
    return rows


def _gqa(rng: np.random.Generator, n: int) -> tuple[Rows, Rows]:
    """(questions, images): two questions per image, joined by `imageId` as in the Hub sets."""
    names = list(COLOURS)
    images, colours = [], []
    for k in range((n + 1) // 2):
        colours.append(names[int(rng.integers(len(names)))])
        images.append({"id": f"n{161313 + k}", "image": picture(rng, colours[-1], count=1 + k % 2)})
    rows = []
    for i in range(n):
        k = i // 2
        question, answer = (
            ("What colour is the square?", colours[k]) if i % 2 == 0 else ("Is there a square?", "yes")
        )
        rows.append(
            {
                "id": f"20{i:06d}",
                "imageId": images[k]["id"],
                "question": question,
                "answer": answer,
                "fullAnswer": f"The answer is {answer}.",
                "isBalanced": True,
                "types": {"structural": "query", "semantic": "attr", "detailed": "colorObject"},
                "semanticStr": "select: square ->query: color",
            }
        )
    return rows, images


def _mme(rng: np.random.Generator, n: int) -> Rows:
    """Pairs of questions on one image (shared question_id), one answered Yes, one No."""
    if n % 2:
        raise ValueError("MME needs an even n: its questions come in pairs per image")
    names = list(COLOURS)
    rows = []
    for k in range(n // 2):
        category = MME_CATEGORIES[k % len(MME_CATEGORIES)]
        colour, other = names[k % len(names)], names[(k + 1) % len(names)]
        image = picture(rng, colour)
        for asked, answer in ((colour, "Yes"), (other, "No")):
            question = f"Is there a {asked} square in the image? Please answer yes or no."
            rows.append(
                {
                    "question_id": f"{category}/{k:04d}.png",
                    "image": image,
                    "question": question,
                    "answer": answer,
                    "category": category,
                }
            )
    return rows


def write_benchmark_data(
    out_dir: str | Path, tasks: list[str] | tuple[str, ...], n: int = 8, seed: int = 0
) -> Path:
    """Write `n` synthetic records per task under `out_dir/<task>/` (and `gqa_images/`); return out_dir."""
    unknown = [t for t in tasks if t not in SPLITS]
    if unknown:
        raise ValueError(f"no synthetic data for {', '.join(unknown)}; tasks: {', '.join(SPLITS)}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        for task in tasks:
            if task == "gqa":
                rows, images = _gqa(rng, n)
                _save(out / GQA_IMAGES, SPLITS[task], images, GQA_IMAGE_FEATURES)
            else:
                rows = BUILDERS[task](rng, n)
            _save(out / task, SPLITS[task], rows, FEATURES[task])
    finally:
        if bars:
            datasets.enable_progress_bars()
    return out


def _save(folder: Path, split: str, rows: Rows, features: dict[str, Any]) -> None:
    data = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    datasets.DatasetDict({split: data}).save_to_disk(str(folder))


BUILDERS = {
    "textvqa_val": _textvqa,
    "scienceqa_img": _scienceqa,
    "realworldqa": _realworldqa,
    "pope": _pope,
    "mme": _mme,
}
FEATURES = {
    "textvqa_val": TEXTVQA_FEATURES,
    "scienceqa_img": SCIENCEQA_FEATURES,
    "realworldqa": REALWORLDQA_FEATURES,
    "pope": POPE_FEATURES,
    "gqa": GQA_FEATURES,
    "mme": MME_FEATURES,
}
