"""The part runner of the one-shot GPU check (bench/bench_gpu.py, bench/gpu_check.sh): parts in priority order under
one time budget, each in a process of its own, every result on disk as soon as it is known.

- A part runs in its own process, so it starts with the whole GPU free (nothing of an earlier part's models, gradients
  or optimizer state is still held) and one that crashes or is stopped takes nothing else down.
- Those processes stay in the runner's process group: a ``timeout`` around the runner (bench/gpu_check.sh has one)
  signals them with it, and none outlives it.
- A part whose expected time (on one H100/H200, cold) is more than what is left of the budget is skipped and reported;
  one that runs past its own limit, or past the budget, is interrupted (SIGINT: Python prints where it was), killed
  10 s later if it is still there, and reported; the parts after it still run.
- The results (JSON) and their table (Markdown) are rewritten after every part, and before each part with that part
  marked running: whatever stops the runner, the files hold every finished part and name the one that was running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

STOP_GRACE_S = 10.0  # between SIGINT and SIGKILL for a part past its limit


@dataclass(frozen=True)
class Part:
    name: str
    what: str  # one line: what it measures or checks
    expected_s: float  # on one H100/H200 with cold caches, the process's start included
    limit_s: float  # stopped after this (or when the budget is spent, whichever comes first)


class Results:
    """The run's record: ``{"budget_s", "tiny", "elapsed_s", "parts": {name: record}}`` in ``json_path`` and a table
    made by ``render`` in ``table_path``, both replaced atomically whenever a record changes."""

    def __init__(self, json_path: Path, table_path: Path, render: Callable[[dict], str], **header: Any):
        self.json_path, self.table_path, self.render = Path(json_path), Path(table_path), render
        self.data: dict[str, Any] = {**header, "elapsed_s": 0.0, "parts": {}}
        self.start = time.monotonic()

    def set(self, name: str, record: dict[str, Any]) -> None:
        self.data["parts"][name] = record
        self.flush()

    def flush(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        write_atomic(self.json_path, json.dumps(self.data, indent=2))
        write_atomic(self.table_path, self.render(self.data))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def base_record(part: Part) -> dict[str, Any]:
    return {"what": part.what, "expected_s": part.expected_s, "limit_s": part.limit_s}


def run_parts(parts: list[Part], launch: Callable[[Part, float], dict[str, Any]], results: Results,
              budget_s: float, tiny: bool = False) -> bool:
    """Run ``parts`` in order with ``launch(part, limit_s) -> record`` (its "status": done, failed); True when none
    failed. A tiny dry run skips nothing ahead of time (its parts take seconds); its limits still apply."""
    for part in parts:
        results.set(part.name, {**base_record(part), "status": "pending"})
    start, ok = time.monotonic(), True
    for part in parts:
        left = budget_s - (time.monotonic() - start)
        need = 1.0 if tiny else part.expected_s
        if need > left:
            note = f"needs ~{need:.0f} s, {max(left, 0):.0f} s left of the {budget_s:.0f} s budget"
            results.set(part.name, {**base_record(part), "status": "skipped", "note": note})
            continue
        limit = min(part.limit_s, left)
        results.set(part.name, {**base_record(part), "status": "running", "run_limit_s": round(limit)})
        t0 = time.monotonic()
        try:
            record = launch(part, limit)
        except KeyboardInterrupt:  # the check's own time limit (SIGINT from its timeout): say where, then stop
            results.set(part.name, {**base_record(part), "status": "failed", "wall_s": round(time.monotonic() - t0, 1),
                                    "note": "interrupted: the whole check ran out of time"})
            raise
        record = {**base_record(part), "status": "done", **record, "wall_s": round(time.monotonic() - t0, 1)}
        ok &= record["status"] == "done"
        results.set(part.name, record)
    return ok


def _default_sigint() -> None:
    """In the child before exec: SIGINT's default action. A check started in the background by a shell (``cmd &``,
    ``nohup``) inherits SIGINT ignored, and a Python started so never raises KeyboardInterrupt: ``stop``'s SIGINT
    would do nothing and SIGKILL would come without a word of where the part was."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_process(cmd: list[str], limit_s: float, result: Path, log: Path | None = None, **popen: Any) -> dict[str, Any]:
    """Run ``cmd`` (in this process group, SIGINT at its default) for at most ``limit_s``; its record is the JSON it
    wrote to ``result``, with status failed when it exited non-zero or was stopped. Output goes to ``log`` (appended)
    or is inherited."""
    result.unlink(missing_ok=True)
    out = open(log, "a") if log else None
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                preexec_fn=_default_sigint, **popen)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            stop(proc)
            record = read_record(result)
            return {**record, "status": "failed", "note": f"stopped at its limit of {limit_s:.0f} s"}
        except BaseException:
            stop(proc)
            raise
    finally:
        if out:
            out.close()
    record = read_record(result)
    if rc != 0:
        record = {**record, "status": "failed", "note": record.get("note") or f"exit {rc}"}
    return record


def read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (a Python process prints its traceback: where it was), SIGKILL after STOP_GRACE_S; reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def plan(parts: list[Part], budget_s: float) -> tuple[list[str], float]:
    """Lines saying which parts run within ``budget_s`` if each takes its expected time, and that total."""
    lines, used = [f"{'part':<24} {'expected':>9} {'limit':>7}  (on one H100/H200; budget {budget_s:.0f} s)"], 0.0
    for part in parts:
        runs = used + part.expected_s <= budget_s
        used += part.expected_s if runs else 0.0
        lines.append(f"{part.name:<24} {part.expected_s:>7.0f} s {part.limit_s:>5.0f} s  "
                     f"{'' if runs else '[skipped at this budget] '}{part.what}")
    return lines, used
