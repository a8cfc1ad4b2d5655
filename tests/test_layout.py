"""The package's layering (STYLE.md): models/data at the bottom, teachers and deploy above them,
distill and eval side by side, demo and cli on top; no private names imported across modules."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "eupe"
LAYER = {  # a package may import only from packages of a lower layer (and from itself)
    "errors": 0,
    "runtime": 0,
    "models": 1,
    "data": 1,
    "teachers": 2,
    "deploy": 2,
    "distill": 3,
    "eval": 3,
    "demo": 4,
    "vlm": 4,  # LLaVA around an encoder; its results use the eval schema
    "cli": 5,
    "__main__": 5,
    "__init__": 5,
}


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) of every import in a file of src/eupe."""
    package = list(path.relative_to(SRC.parent).with_suffix("").parts)[:-1]  # e.g. ["eupe", "distill"]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
    return found


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "eupe" and len(parts) > 1 else ("__init__" if module == "eupe" else None)


def test_layers_and_private_names():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        mine = rel.parts[0].removesuffix(".py")
        for module, names, line in _imports(path):
            top = _top(module)
            if top is None:
                continue
            # above: never; beside: only the shared helpers (errors/runtime) and the entry points
            beside = LAYER[top] == LAYER[mine] and LAYER[mine] not in (0, 5)
            if top != mine and (LAYER[top] > LAYER[mine] or beside):
                problems.append(
                    f"{rel}:{line}: {mine} (layer {LAYER[mine]}) imports {module} (layer {LAYER[top]})"
                )
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{rel}:{line}: imports private {private} from {module}")
    assert not problems, "\n".join(problems)
