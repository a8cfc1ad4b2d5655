"""Run any Python process as if only `pip install 'eupe[EXTRAS]'` had been done.

With `PYTHONPATH=tests/extras_guard` and `EUPE_ONLY_EXTRAS=demo` (a comma list; empty for the core
alone), every installed distribution that neither eupe's core requirements nor those extras pull in
(directly or through their own requirements) cannot be imported: an import of it fails the way a
missing package does, and `importlib.util.find_spec` says it is absent. Child processes inherit both
variables, so worker processes are held to the same rule. See `.ci/extras_check` and
tests/test_extras.py.
"""

from __future__ import annotations

import os

if "EUPE_ONLY_EXTRAS" in os.environ:
    from only_extras import install  # noqa: E402 (only when asked)

    install([e for e in os.environ["EUPE_ONLY_EXTRAS"].split(",") if e.strip()])
