"""Every example in every `eupe ... --help` parses: the examples are the CLI's documentation."""

from __future__ import annotations

import argparse
import shlex

from eupe.cli import build_parser


def _examples(parser: argparse.ArgumentParser) -> list[str]:
    found = [line.strip() for line in (parser.epilog or "").splitlines() if line.strip().startswith("eupe ")]
    for action in parser._actions:  # argparse has no public way to list subcommands
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _examples(sub)
    return found


def test_every_help_example_parses():
    parser = build_parser()
    examples = _examples(parser)
    assert len(examples) > 30 and any("eupe eval knn" in e and "protocol=" in e for e in examples)
    for line in examples:
        argv = shlex.split(line, comments=True)[1:]
        argv = argv[: argv.index(">")] if ">" in argv else argv  # shell redirection
        args = parser.parse_args(argv)  # exits (SystemExit 2) on an example that does not parse
        assert callable(args.run), line
