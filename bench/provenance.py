"""Where a results file's figures come from, and whether they still describe the code.

Every results file a README figure cites carries a provenance record: the commit the benchmark ran at, the measured
files it names that had uncommitted changes then (none, for a figure worth citing), the machine (CPU model, cores,
load, torch), the date and the command. ``changes_since`` lists the commits after that one that changed the
measured files: tests/test_results_fresh.py fails on any, so a figure cannot go stale silently.

A JSON results file holds the record under "provenance"; a text or Markdown file holds one line
``provenance: {...}`` per run it holds (in an HTML comment in Markdown).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"provenance: (\{.*\})")


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.rstrip("\n")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record(measures: list[str], threads: int | None = None, cwd: Path = ROOT) -> dict[str, Any]:
    """The provenance of a measurement taken now of the code in ``measures`` (paths relative to the repository)."""
    missing = [m for m in measures if not (cwd / m).exists()]
    if missing:
        raise FileNotFoundError(f"measured paths that do not exist: {missing}")
    import torch

    return {"commit": _git("rev-parse", "HEAD", cwd=cwd),
            "uncommitted": _git("status", "--porcelain", "--", *measures, cwd=cwd).splitlines(),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2),
                        "torch_threads": threads if threads is not None else torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version()},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m " + " ".join([_module_name(), *map(shlex.quote, sys.argv[1:])]),
            "measures": list(measures)}


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def line(prov: dict[str, Any]) -> str:
    """The one-line form for a text results file."""
    return "provenance: " + json.dumps(prov, separators=(", ", ": "))


def read(path: str | Path) -> list[dict[str, Any]]:
    """The provenance records of a results file (one per run it holds; none: an empty list)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        prov = json.loads(text).get("provenance")
        return [prov] if prov else []
    return [json.loads(m.group(1)) for m in LINE.finditer(text)]


def changes_since(prov: dict[str, Any], cwd: Path = ROOT) -> list[str]:
    """The commits after the measured one, up to HEAD, that changed a measured path ("<hash> <subject>").

    Raises LookupError when the measured commit is not in this repository's history."""
    commit = prov["commit"]
    try:
        _git("cat-file", "-e", f"{commit}^{{commit}}", cwd=cwd)
    except subprocess.CalledProcessError:
        raise LookupError(f"commit {commit} is not in this repository's history") from None
    out = _git("log", "--format=%h %s", f"{commit}..HEAD", "--", *prov["measures"], cwd=cwd)
    return out.splitlines()
