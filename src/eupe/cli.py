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
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    p.add_argument("--resume", metavar="OUTPUT_DIR", help="continue the run in OUTPUT_DIR")
    p.set_defaults(run=_run_distill)


def _run_distill(args: argparse.Namespace) -> int:
    from .distill import distill_from_cli

    final = distill_from_cli(args.config, args.overrides, args.resume)
    print(f"final student: {final}")
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


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_cmd_models, _cmd_distill, _cmd_plan]


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
