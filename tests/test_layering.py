"""The package's layering, as README.md's Development section states it in one table: the base
(errors, files, runtime) under everything, models and teachers on it, data/distill/eval/deploy/vlm
above them, demo and cli on top; vlm and distill never import each other. Also: no private names
imported across modules."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "eupe"
BASE = ("errors", "files", "runtime")


def _rule() -> dict[str, set[str]]:
    """README's table: part -> the other parts it may import ("base" stands for the base's three)."""
    text = ROOT.joinpath("README.md").read_text().split("## Development", 1)[1].split("\nLayering:", 1)[1]
    table = text.split("\n\n")[1]  # the paragraph after the one that introduces it
    rule = {}
    for left, right in re.findall(r"^\| (`.+?) \| (.+?) \|$", table, re.M):
        allowed = set() if right == "nothing" else {p.strip() for p in right.split(",")}
        if "base" in allowed:
            allowed = (allowed - {"base"}) | set(BASE)
        rule.update({part: allowed for part in re.findall(r"`(\w+)`", left)})
    return rule


def _part(module: str) -> str | None:
    """The part of src/eupe a dotted module belongs to (`eupe.distill.plan.spec` -> distill); None
    outside eupe, and for the package itself: every part runs its `__init__` already."""
    parts = module.split(".")
    return parts[1] if parts[0] == "eupe" and len(parts) > 1 else None


def _is_part(name: str) -> bool:
    return (SRC / name / "__init__.py").exists() or (SRC / f"{name}.py").exists()


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) of every import in a file of src/eupe, at any depth
    (function-level imports count: they are arrows too, only later)."""
    package = list(path.relative_to(SRC.parent).with_suffix("").parts)[:-1]  # e.g. ["eupe", "distill"]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names = [a.name for a in node.names]
            if module == "eupe":  # `from .. import errors` imports the part, not the package
                found += [(f"eupe.{n}", [], node.lineno) for n in names if _is_part(n)]
                names = [n for n in names if not _is_part(n)]
            found.append((module, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
    return found


def test_readme_table_covers_every_part():
    rule = _rule()
    parts = {p.name.removesuffix(".py") for p in SRC.iterdir() if _is_part(p.name.removesuffix(".py"))}
    assert set(rule) == parts, f"README.md's layering table and src/eupe differ: {set(rule) ^ parts}"
    assert all(allowed <= parts for allowed in rule.values()), rule


def test_layers_and_private_names():
    rule = _rule()
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        mine = rel.parts[0].removesuffix(".py")
        for module, names, line in _imports(path):
            theirs = _part(module)
            if theirs is None:
                continue
            if theirs != mine and theirs not in rule[mine]:
                problems.append(
                    f"{rel}:{line}: {mine} imports {module}; README.md lets {mine} import {sorted(rule[mine])}"
                )
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{rel}:{line}: imports private {private} from {module}")
    assert not problems, "\n".join(problems)
