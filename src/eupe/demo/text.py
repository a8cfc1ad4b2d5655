"""Text rendered onto photos with an exact per-pixel mask (the demo's OCR benchmark labels).

Each line is drawn into its own coverage layer (Pillow's anti-aliased glyph coverage, optionally
rotated), and the image is blended with exactly that layer: out = img * (1 - a) + color * a.
The mask is `a >= 0.5` accumulated over lines, so it marks precisely the pixels that are at least
half text colour. No estimate, no threshold on the result image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Short, common words plus digits: enough variety for a detector to fire, nothing language-specific.
WORDS = (
    "open close exit stop sale coffee tea bus city park north south east west road street hotel "
    "cafe bank taxi police fire station market fresh fruit daily news print photo cat dog bird "
    "garden river bridge tower museum music cinema pizza bread milk water light green blue red "
    "yellow black white house school office room floor level gate line train ticket price free "
    "new old big small fast slow left right up down one two three four five zero hello world "
    "model data image pixel vision learn teach student paper"
).split()


@dataclass(frozen=True)
class TextSettings:
    """Sizes are fractions of the image's short side."""

    min_lines: int = 1
    max_lines: int = 3
    min_height: float = 0.07
    max_height: float = 0.2
    max_words: int = 3
    rotate_prob: float = 0.3
    max_angle: float = 20.0


def random_string(rng: np.random.Generator, max_words: int) -> str:
    n = int(rng.integers(1, max_words + 1))
    words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=n)]
    if rng.random() < 0.3:
        words.append(str(int(rng.integers(0, 10000))))
    text = " ".join(words)
    style = rng.random()
    return text.upper() if style < 0.35 else text.title() if style < 0.6 else text


def _font(path: Path | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow >= 10.1 ships a scalable default font (needs FreeType, which wheels include).
    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(str(path), size)


def _line_coverage(
    text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """(float glyph coverage in [0, 1], bool line box) of one rendered line, same tight crop.

    The line box is the glyphs' ink bounding rectangle (+1 px), rotated with them: the text *region*.
    """
    left, top, right, bottom = font.getbbox(text)
    pad = 2
    layer = Image.new("L", (int(right - left) + 2 * pad, int(bottom - top) + 2 * pad), 0)
    ImageDraw.Draw(layer).text((pad - left, pad - top), text, fill=255, font=font)
    ink = layer.getbbox()
    box = Image.new("L", layer.size, 0)
    if ink is not None:
        # one pixel of margin so bicubic rotation never puts half-covered glyph pixels outside
        ImageDraw.Draw(box).rectangle((ink[0] - 1, ink[1] - 1, ink[2], ink[3]), fill=255)
    if angle:
        layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
        box = box.rotate(angle, resample=Image.Resampling.NEAREST, expand=True)
    crop = box.getbbox()
    if crop is not None:
        layer, box = layer.crop(crop), box.crop(crop)
    return np.asarray(layer, dtype=np.float32) / 255.0, np.asarray(box) > 0


def _text_color(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour that contrasts with the mean luminance under the text (dark on light, light on dark)."""
    lum = float((region @ np.array([0.299, 0.587, 0.114])).mean()) if region.size else 128.0
    base = rng.uniform(0, 60, size=3) if lum > 110 else rng.uniform(200, 255, size=3)
    tint = rng.uniform(-40, 40, size=3) * (rng.random() < 0.5)
    return np.clip(base + tint, 0, 255)


def render_text(
    image: Image.Image | np.ndarray,
    rng: np.random.Generator,
    fonts: list[Path | None],
    settings: TextSettings = TextSettings(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw 1..max_lines random text lines.

    Returns (uint8 HxWx3 image, bool HxW glyph mask, bool HxW line-region mask). The glyph mask is
    exact (pixels >= 50% text colour); the region mask is each line's rotated ink rectangle.
    `fonts` lists TrueType files; None stands for Pillow's built-in scalable font.
    """
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    img = img.copy()
    h, w = img.shape[:2]
    mask = np.zeros((h, w), dtype=bool)
    regions = np.zeros((h, w), dtype=bool)
    short = min(h, w)
    n_lines = int(rng.integers(settings.min_lines, settings.max_lines + 1))
    for _ in range(n_lines):
        size = max(6, round(short * rng.uniform(settings.min_height, settings.max_height)))
        font = _font(fonts[int(rng.integers(0, len(fonts)))], size)
        text = random_string(rng, settings.max_words)
        angle = (
            float(rng.uniform(-settings.max_angle, settings.max_angle))
            if rng.random() < settings.rotate_prob
            else 0.0
        )
        cov, line_box = _line_coverage(text, font, angle)
        ch, cw = cov.shape
        if ch == 0 or cw == 0:
            continue
        # Place so at least 60% of the line's width is inside the image (text may run off an edge).
        x0 = int(rng.integers(-int(0.2 * cw), max(1, w - int(0.8 * cw))))
        y0 = int(rng.integers(0, max(1, h - ch)))
        xs, ys = max(0, x0), max(0, y0)
        xe, ye = min(w, x0 + cw), min(h, y0 + ch)
        if xe <= xs or ye <= ys:
            continue
        a = cov[ys - y0 : ye - y0, xs - x0 : xe - x0, None]
        region = img[ys:ye, xs:xe]
        color = _text_color(region[a[..., 0] > 0.5], rng)
        img[ys:ye, xs:xe] = region * (1.0 - a) + color * a
        mask[ys:ye, xs:xe] |= a[..., 0] >= 0.5
        regions[ys:ye, xs:xe] |= line_box[ys - y0 : ye - y0, xs - x0 : xe - x0]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask, regions
