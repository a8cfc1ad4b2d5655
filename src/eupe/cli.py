"""The `eupe` command. Thin: parse arguments, call the library, print, exit.

Each subcommand is a `_cmd_<name>(sub)` function that adds its parser and sets `run`.
Errors derived from `EupeError` print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable, Sequence

from .errors import EupeError


def _parser(sub: argparse._SubParsersAction, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# --- eupe models -------------------------------------------------------------------------------
def _cmd_models(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "models",
        "list the model zoo: parameters, stride, embed dim, registers",
        """
        eupe models
        eupe models --json > zoo.json
    """,
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from .models import ZOO, count_params, create_model

    rows = []
    for name, spec in ZOO.items():
        model = create_model(name, device="meta")  # no memory, even for the 1.9B proxy
        rows.append(
            {
                "name": name,
                "params": count_params(model),
                "stride": spec.stride,
                "embed_dim": spec.embed_dim,
                "registers": spec.num_registers,
                "timm": spec.timm_name,
                "description": spec.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<22}{'params':>15}{'stride':>8}{'dim':>6}{'regs':>6}  description")
    for r in rows:
        print(
            f"{r['name']:<22}{r['params']:>15,}{r['stride']:>8}{r['embed_dim']:>6}{r['registers']:>6}  "
            f"{r['description']}"
        )
    print(
        "params: entries of the official state_dict (ViTs include the zero-masked key bias and "
        "the mask token)"
    )
    return 0


# --- eupe distill ------------------------------------------------------------------------------
def _cmd_distill(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "distill",
        "distill teachers into a student (paper Stages 1-3); writes config, metrics, checkpoints, final/",
        """
        eupe distill configs/tiny/stage1.yaml output_dir=S1
        eupe distill configs/tiny/stage2.yaml teachers.proxy.checkpoint=S1/final output_dir=S2
        eupe distill configs/tiny/stage3.yaml teachers.proxy.checkpoint=S1/final student.init=S2/final
        eupe distill configs/paper/stage2_vitb16.yaml train.lr=1e-5 train.accum_steps=8
        eupe distill --resume S2          # continue a killed run from its newest checkpoint
    """,
    )
    p.add_argument("config", nargs="?", help="YAML config (see configs/paper and configs/tiny)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. train.lr=1e-4; ~key deletes a key",
    )
    p.add_argument("--resume", metavar="OUTPUT_DIR", help="continue the run in OUTPUT_DIR")
    p.set_defaults(run=_run_distill)


def _run_distill(args: argparse.Namespace) -> int:
    from .distill import distill_from_cli

    final = distill_from_cli(args.config, args.overrides, args.resume)
    print(f"final student: {final}")
    return 0


# --- eupe eval ---------------------------------------------------------------------------------
_EVAL_HELP = {
    "knn": (
        "k-NN top-1 on the cls token (IN1k-KNN); DATA has train/<class>/ and val/<class>/",
        "k=[10,20] batch_size=128",
    ),
    "zeroshot": (
        "zero-shot top-1 through a teacher's text tower and the student's adapter head (IN1k-ZS)",
        "teacher=pe_core text_model=PE-Core-B-16 text_weights=pe_core_b16.bin classnames=names.txt",
    ),
    "seg": (
        "linear segmentation probe on ADE20k (ADEChallengeData2016 layout), mIoU",
        "iterations=2000 batch_size=8",
    ),
    "depth": (
        "linear depth probe on NYUv2 (BTS lists nyu_train.txt/nyu_test.txt), RMSE in metres",
        "iterations=2000",
    ),
    "spair": ("training-free keypoint correspondence on SPair-71k, PCK@0.1", "pairs_per_category=20"),
    "pca": ("PCA pictures of patch tokens: a grid of images x models (pca.png)", "joint=true max_images=4"),
}


def _cmd_eval(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "eval",
        "evaluate frozen encoders: knn, zeroshot, seg, depth, spair, pca, or a whole suite",
        """
        eupe eval knn --model runs/s3/final --data /data/imagenet --output-dir out/knn
        eupe eval seg --model eupe_vitb16 --weights eupe_vitb16.pth --data /data/ADEChallengeData2016
        eupe eval pca --model eupe_vitt16,runs/s3/final --data photos/ --output-dir out/pca
        eupe eval suite configs/eval/demo.yaml output_dir=out/suite
    """,
    )
    tasks = p.add_subparsers(dest="eval_task", metavar="TASK")
    for task, (help_text, example) in _EVAL_HELP.items():
        t = _parser(
            tasks,
            task,
            help_text,
            f"eupe eval {task} --model eupe_vitt16 --weights W.pth --data ROOT --output-dir out/{task} {example}",
        )
        t.add_argument(
            "--model", required=True, help="final/ folder, zoo name, or timm name (pca: comma-separated)"
        )
        t.add_argument("--data", required=True, help="dataset root in the benchmark's real layout")
        t.add_argument("--weights", help="weights for a zoo/timm name (official .pth works)")
        t.add_argument("--output-dir", help="where results.json goes (default: ./eval_<task>_<model>)")
        t.add_argument(
            "overrides", nargs="*", metavar="key=value", help="settings, e.g. iterations=100 lr=1e-3"
        )
        t.set_defaults(run=_run_eval, eval_task=task)
    s = _parser(
        tasks,
        "suite",
        "run evaluations over models; write table.md and radar.png",
        "eupe eval suite configs/eval/demo.yaml",
    )
    s.add_argument("config", help="suite YAML (see configs/eval/)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. output_dir=out")
    s.set_defaults(run=_run_eval_suite)
    p.set_defaults(run=lambda args: p.print_help() or 0)


def _run_eval(args: argparse.Namespace) -> int:
    from .eval.report import format_result, run_task

    result, out = run_task(
        args.eval_task, args.model, args.data, args.weights, args.output_dir, args.overrides
    )
    print(format_result(result))
    print(f"results: {out / 'results.json'}")
    return 0


def _run_eval_suite(args: argparse.Namespace) -> int:
    from .eval.report import load_suite_config, run_suite

    summary = run_suite(load_suite_config(args.config, args.overrides))
    print(open(summary["table"]).read())
    print(f"table: {summary['table']}\nradar: {summary['radar']}")
    return 0


# --- eupe plan ---------------------------------------------------------------------------------
def _cmd_plan(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "plan",
        "estimate a distill config's FLOPs, memory per GPU and wall-clock days (shows its formulas)",
        """
        eupe plan configs/paper/stage2_vitb16.yaml --gpus 64 --gpu h100 --json plan.json
        eupe plan configs/paper/stage1_proxy.yaml --gpus 64 --fsdp --activation-checkpointing
        eupe plan configs/paper/stage3_vitb16.yaml --gpus 32 --gpu a100 --mfu 0.35 --micro-batch 32
        eupe plan configs/tiny/stage2.yaml --gpus 1 --arch proxy=eupe_vitt16 student.overrides.depth=1
    """,
    )
    p.add_argument("config", help="distill YAML config (configs/paper/...)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=1000"
    )
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (data-parallel world size)")
    p.add_argument("--gpu", default="h100", choices=["h100", "h200", "a100"], help="GPU type (default h100)")
    p.add_argument(
        "--mfu", type=float, default=0.4, help="assumed fraction of peak bf16 FLOP/s (default 0.4)"
    )
    p.add_argument(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shard student, heads, optimizer and teachers over the GPUs (default: only for students > 1B params)",
    )
    p.add_argument("--activation-checkpointing", action="store_true", help="checkpoint every student block")
    p.add_argument("--micro-batch", type=int, help="images per GPU per forward (default global_batch / gpus)")
    p.add_argument("--dataset-size", type=int, help="images in the dataset, e.g. 1689000000 for LVD-1689M")
    p.add_argument(
        "--arch",
        action="append",
        metavar="TEACHER=ZOO_NAME",
        help="zoo architecture of an eupe teacher whose final/ folder does not exist yet (default eupe_proxy_g16)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the full estimate as JSON")
    p.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from .distill.plan import plan_from_cli

    plan_from_cli(
        args.config,
        args.overrides,
        args.gpus,
        args.gpu,
        args.mfu,
        args.fsdp,
        args.activation_checkpointing,
        args.micro_batch,
        args.dataset_size,
        args.arch,
        args.json,
    )
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _cmd_models,
    _cmd_distill,
    _cmd_eval,
    _cmd_plan,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eupe",
        description="EUPE: distill universal vision encoders, evaluate them, export them.",
        epilog="run `eupe COMMAND --help` for a command's options and examples",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"eupe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except EupeError as e:
        print(f"eupe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"eupe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
