"""Pre-emption: SLURM's warning signal (SIGUSR1) or SIGTERM asks the loop to checkpoint and exit at a step boundary;
after the checkpoint, $LDM_REQUEUE_CMD (e.g. `scontrol requeue $SLURM_JOB_ID`) puts the job back in the queue."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

log = logging.getLogger(__name__)


class StopRequest:
    """Records SIGUSR1 (SLURM's pre-emption warning) or SIGTERM; the loop checkpoints and exits at a step boundary."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def requeue() -> None:
    """Run $LDM_REQUEUE_CMD (e.g. `scontrol requeue $SLURM_JOB_ID`) once the checkpoint is complete."""
    cmd = os.environ.get("LDM_REQUEUE_CMD")
    if cmd:
        log.warning("requeueing: %s", cmd)
        subprocess.run(cmd, shell=True, check=False)
