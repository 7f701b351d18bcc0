"""Stop signals and the requeue command: which signal asks for what, agreed on by every rank.

* SIGUSR1 — SLURM's warning before the time limit (``--signal=B:USR1@300``), or ``scancel --signal=USR1``:
  checkpoint at the next step, rank 0 runs ``$LDM_REQUEUE_CMD`` (``scontrol requeue $SLURM_JOB_ID``), exit 0.
* SIGTERM — ``scancel``, ``docker stop``, a node drain: checkpoint at the next step and exit 143 (128 + 15),
  with no requeue: a cancelled job stays cancelled.

A requeue command that fails (non-zero exit, not found, hangs past its timeout) is logged as an error and
makes the exit code 1: the job will not come back by itself, and the scheduler and the user are told so.

The training loop's part::

    stop = StopRequest()                       # at start; stop.restore() at the end
    ...                                        # every step, on every rank:
    action = agreed_action(stop)               # one collective; "" | "requeue" | "stop"
    if action:
        checkpoint(...)                        # every rank
        return exit_code(action, run_requeue() if action == "requeue" and rank == 0 else None)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

import torch

from ldm.train.distributed import reduce_scalar

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR1
STOP_SIGNALS = (signal.SIGTERM,)
EXIT_REQUEUE_FAILED = 1
EXIT_STOPPED = 128 + signal.SIGTERM
ACTIONS = ("", "requeue", "stop")  # ordered: "stop" on any rank wins over "requeue" on another


class StopRequest:
    """Records the stop signals this process received (handlers are installed from the main thread only)."""

    def __init__(self, install: bool = True):
        self.received: list[int] = []
        self._previous: dict[int, object] = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in (REQUEUE_SIGNAL, *STOP_SIGNALS):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)

    @property
    def action(self) -> str:
        """This process's wish: "" (go on), "requeue" (only SIGUSR1 came) or "stop" (a SIGTERM came)."""
        if any(s in STOP_SIGNALS for s in self.received):
            return "stop"
        return "requeue" if REQUEUE_SIGNAL in self.received else ""

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def agreed_action(stop: StopRequest) -> str:
    """The same action on every rank: "stop" if any rank got SIGTERM, else "requeue" if any got SIGUSR1."""
    code = ACTIONS.index(stop.action)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        code = int(reduce_scalar(code, "max").item())
    return ACTIONS[code]


def run_requeue(command: str | None = None, timeout: float = 120.0) -> bool | None:
    """Run the requeue command (default $LDM_REQUEUE_CMD) after the checkpoint is complete.

    Returns None when there is no command (nothing to do), True when it exited 0, False when it failed,
    after logging why as an error.
    """
    command = os.environ.get("LDM_REQUEUE_CMD") if command is None else command
    if not command:
        return None
    log.warning("requeueing: %s", command)
    try:
        proc = _run_ignoring_sigterm(command, timeout)
    except subprocess.TimeoutExpired:
        reason = f"did not finish within {timeout:g} s"
    else:
        if proc.returncode == 0:
            return True
        output = (proc.stderr or proc.stdout).strip().splitlines()
        reason = f"exited {proc.returncode}" + (f": {output[-1]}" if output else "")
    message = (f"requeue command failed ({reason}): {command!r}; the checkpoint is written but the job will "
               "not restart by itself: resubmit it")
    log.error(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return False


def _run_ignoring_sigterm(command: str, timeout: float) -> subprocess.CompletedProcess:
    """Run the shell command with SIGTERM ignored (inherited through exec): `scontrol requeue` makes SLURM end every
    process of the job with SIGTERM while the command returns, its own process among them, which turned a requeue that
    happened into a "failed (exited -15)" report. The timeout still bounds it."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if main else None
    try:
        return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=timeout)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def exit_code(action: str, requeued: bool | None) -> int:
    """The process's exit code after the checkpoint: 0 (requeued, or nothing to run), 1 (requeue failed),
    143 (stopped by SIGTERM)."""
    if action == "stop":
        return EXIT_STOPPED
    if action == "requeue":
        return EXIT_REQUEUE_FAILED if requeued is False else 0
    raise ValueError(f"no stop was requested (action {action!r})")
