"""Prompt templates for zero-shot classification (`eupe eval zeroshot templates=...`).

`openai_imagenet` (the default) is the public list of 80 ImageNet prompt templates released with
CLIP (Radford et al. 2021, "Prompt_Engineering_for_ImageNet" notebook), the set used by CLIP,
open_clip and the PE papers for ImageNet zero-shot numbers; the EUPE paper does not name its
templates, so we take the standard ones. `simple` is the single template "a photo of a {}.".
Anything else is read as a text file with one template per line, each containing `{}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError

OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
    "simple": ("a photo of a {}.",),
}


def _checked(templates: Sequence[str], where: str) -> list[str]:
    templates = [t for t in templates]
    if not templates:
        raise ConfigError(f"{where}: no templates")
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise ConfigError(f"{where}: template {bad[0]!r} has no '{{}}' for the class name")
    return templates


def resolve_templates(spec: str | Sequence[str]) -> list[str]:
    """`openai_imagenet` | `simple` | a text file (one template per line) | a list of templates."""
    if not isinstance(spec, str):
        return _checked(list(spec), "templates")
    if spec in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"templates={spec!r}: not one of {', '.join(TEMPLATE_SETS)} and not a file "
            "(a text file with one template per line, each containing '{}')"
        )
    lines = [line.strip() for line in path.read_text().splitlines()]
    return _checked([line for line in lines if line], str(path))
