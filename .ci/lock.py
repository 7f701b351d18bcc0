"""Write constraints.txt: the exact versions installed in this venv of everything pyproject.toml needs.

Run it from a venv where `./run.sh test` passed:  .venv/bin/python .ci/lock.py
It walks the dependency closure of the project's dependencies and its `test` extra over the installed
distributions (markers evaluated here), so the file pins what was tested and nothing else.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# Exact versions for ./run.sh setup (pip install -c constraints.txt): what the test suite passed with on
# Python 3.11, x86_64 Linux. Written by .ci/lock.py; pyproject.toml holds the supported ranges.
"""


def closure(roots: list[Requirement]) -> dict[str, str]:
    """name -> installed version for every distribution the requirements pull in (with their extras)."""
    dists = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    found: dict[str, str] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    stack = [r for r in roots if r.marker is None or r.marker.evaluate({"extra": ""})]
    while stack:
        req = stack.pop()
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        if (name, extras) in done:
            continue
        done.add((name, extras))
        dist = dists.get(name)
        if dist is None:
            sys.exit(f"error: {req} is required but not installed: install the project first")
        found[name] = dist.version
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras | {""}):
                stack.append(sub)
    return found


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    pins = closure(roots)
    (ROOT / "constraints.txt").write_text(HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    print(f"constraints.txt: {len(pins)} pins")


if __name__ == "__main__":
    main()
