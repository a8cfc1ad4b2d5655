"""How much two small differences from Meta's code change a distillation run (docs/fidelity.md).

1. RoPE draw: Meta's ViT draws the train-time RoPE rescale once per block, timm (this project) once
   per forward. Variant `rope_per_block` switches the student to Meta's way
   (`eupe.models.rope.rope_draws_per_block`).
2. Blur kernel: Meta's `GaussianBlur` uses a fixed 9-tap kernel, this project +-3 sigma
   (`eupe.data.photometric.blur_size`, 3 to 13 taps for sigma 0.1-2). Variant `blur9` uses 9 taps.

Each variant trains the tiny Stage 1 (`configs/tiny/stage1.yaml`, CPU) at every seed, so a
difference between variants can be read against the seed-to-seed spread of the baseline.

    .venv/bin/python benchmarks/meta_draws.py --steps 60 --seeds 0 1 2
Prints one JSON line per run: the variant, the seed, the final loss and the mean of the last 10.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import eupe.data.photometric as photometric
import eupe.distill.stages as stages
from eupe.distill.config import load_config
from eupe.distill.trainer import METRICS_FILE, distill
from eupe.models.rope import rope_draws_per_block

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage1.yaml"


def blur9(sigma: float, view_size: int) -> int:
    """Meta's fixed 9-tap kernel (torchvision `GaussianBlur(kernel_size=9)`), clamped like ours."""
    limit = view_size - 1 if view_size % 2 == 0 else view_size
    return min(9, limit)


def run(variant: str, seed: int, steps: int) -> dict:
    build, size = stages.build_student, photometric.blur_size
    if variant == "rope_per_block":
        stages.build_student = lambda *a, **k: rope_draws_per_block(build(*a, **k))
    if variant == "blur9":
        photometric.blur_size = blur9
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(
                CONFIG,
                [
                    f"output_dir={out}",
                    f"seed={seed}",
                    f"train.max_steps={steps}",
                    f"train.checkpoint_every={steps}",
                ],
            )
            distill(cfg)
            rows = [json.loads(line) for line in (Path(out) / METRICS_FILE).read_text().splitlines()]
    finally:
        stages.build_student, photometric.blur_size = build, size
    losses = [r["loss"] for r in rows if "loss" in r and math.isfinite(r["loss"])]
    return {
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "final_loss": losses[-1],
        "mean_last10": sum(losses[-10:]) / len(losses[-10:]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    for seed in a.seeds:
        for variant in ("baseline", "rope_per_block", "blur9"):
            print(json.dumps(run(variant, seed, a.steps)), flush=True)


if __name__ == "__main__":
    main()
