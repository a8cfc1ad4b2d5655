"""A generated LLaVA-format dataset (coloured shapes), for the tiny config and the tests.

Each image shows one shape in one colour. Stage A's captions name both ("a red circle."); stage B
asks about them in one or two rounds, and adds one text-only record, as the 665K mix has. The
answers follow from the pixels, so a working pipeline lowers the loss in both stages.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    im = Image.new("RGB", (size + rng.randint(0, size // 2), size), bg)
    d = ImageDraw.Draw(im)
    r = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(r, im.width - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return im


def write_toy_data(folder: str | Path, n: int = 48, size: int = 64, seed: int = 0) -> dict[str, str]:
    """Write `n` images plus `stage_a.json` and `stage_b.json` under `folder`; return their paths."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, chats = [], []
    for i in range(n):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        name = f"images/{i:04d}.png"
        _draw(shape, COLOURS[colour], size, rng).save(folder / name)
        captions.append(
            {
                "id": f"a{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image briefly."},
                    {"from": "gpt", "value": f"a {colour} {shape}."},
                ],
            }
        )
        turns = [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": colour.capitalize()},
        ]
        if i % 2:
            turns += [{"from": "human", "value": "Which shape is it?"}, {"from": "gpt", "value": shape}]
        chats.append({"id": f"b{i}", "image": name, "conversations": turns})
    chats.append(
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}],
        }
    )
    paths = {
        "images": str(folder),
        "stage_a": str(folder / "stage_a.json"),
        "stage_b": str(folder / "stage_b.json"),
    }
    Path(paths["stage_a"]).write_text(json.dumps(captions))
    Path(paths["stage_b"]).write_text(json.dumps(chats))
    return paths
