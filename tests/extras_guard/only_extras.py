"""The import guard behind sitecustomize.py: which distributions an install of eupe[EXTRAS] brings."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata as md
import importlib.util
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def _requirements(dist: str, extras: set[str]) -> list[Requirement]:
    """`dist`'s requirements that apply with `extras` requested, on this Python and platform."""
    out = []
    for text in md.requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            out.append(req)
    return out


def installed_by(extras: list[str]) -> set[str]:
    """Canonical names of the distributions `pip install 'eupe[extras]'` installs (eupe included)."""
    todo, seen = [("eupe", frozenset(extras))], set()
    while todo:
        dist, wanted = todo.pop()
        if (dist, wanted) in seen:
            continue
        seen.add((dist, wanted))
        try:
            reqs = _requirements(dist, set(wanted))
        except md.PackageNotFoundError:  # an optional requirement that is not installed here
            continue
        todo += [(canonicalize_name(r.name), frozenset(r.extras)) for r in reqs]
    return {dist for dist, _ in seen}


def blocked_modules(extras: list[str]) -> set[str]:
    """Top-level import names that only distributions outside eupe[extras] provide."""
    allowed = installed_by(extras)
    blocked = set()
    for name, dists in md.packages_distributions().items():
        if not {canonicalize_name(d) for d in dists} & allowed and name not in sys.stdlib_module_names:
            blocked.add(name)
    return blocked


def _installed(top: str) -> bool:
    """Whether `top` resolves into site-packages (not, say, this repository's own `tests`)."""
    spec = importlib.machinery.PathFinder.find_spec(top)
    where = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), None))
    return bool(where) and ("site-packages" in where or "dist-packages" in where)


class _Absent:
    """A meta-path finder that makes the blocked top-level modules look uninstalled."""

    def __init__(self, blocked: set[str], extras: list[str]):
        self.blocked, self.extras = blocked, extras

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in self.blocked and _installed(top):
            extras = ",".join(self.extras) or "no extras"
            raise ModuleNotFoundError(f"No module named '{top}' (guard: eupe[{extras}])", name=top)
        return None


def install(extras: list[str]) -> None:
    finder = _Absent(blocked_modules(extras), extras)
    sys.meta_path.insert(0, finder)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):  # availability probes see the package as missing
        top = name.partition(".")[0]
        if not name.startswith(".") and top in finder.blocked and _installed(top):
            return None
        return real_find_spec(name, package)

    importlib.util.find_spec = find_spec
