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


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_cmd_models, _cmd_distill]


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
