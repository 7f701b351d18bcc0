"""ldm.train.preemption: SIGUSR1 asks for a requeue, SIGTERM (scancel) only for a stop; a failed requeue
command is logged and makes the exit code 1; ranks agree on one action."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ldm.train.distributed import free_port
from ldm.train.preemption import EXIT_STOPPED, StopRequest, exit_code, run_requeue
from tests.conftest import ROOT


def test_sigterm_stops_without_requeue_and_sigusr1_requeues():
    with StopRequest() as stop:
        assert stop.action == ""
        os.kill(os.getpid(), signal.SIGTERM)  # scancel
        assert stop.action == "stop" and exit_code(stop.action, None) == EXIT_STOPPED == 143
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning before the time limit
        assert stop.action == "requeue"
        os.kill(os.getpid(), signal.SIGTERM)  # then cancelled: stays cancelled
        assert stop.action == "stop"


def test_restore_puts_back_the_previous_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    stop = StopRequest()
    assert signal.getsignal(signal.SIGTERM) == stop._handle
    stop.restore()
    assert {s: signal.getsignal(s) for s in before} == before


def test_requeue_command_success_and_absence(tmp_path, monkeypatch):
    marker = tmp_path / "requeued"
    monkeypatch.setenv("LDM_REQUEUE_CMD", f"echo requeue 42 > {marker}")
    assert run_requeue() is True and marker.read_text() == "requeue 42\n"
    assert exit_code("requeue", True) == 0
    monkeypatch.setenv("LDM_REQUEUE_CMD", "")
    assert run_requeue() is None and exit_code("requeue", None) == 0  # nothing to run: a plain stop, exit 0


@pytest.mark.parametrize("command, timeout, reason", [
    ("echo 'scontrol: error: Invalid job id' >&2; exit 1", 30, "exited 1: scontrol: error: Invalid job id"),
    ("no-such-requeue-command-here", 30, "exited 127"),
    ("sleep 5", 0.3, "did not finish within 0.3 s"),
])
def test_failed_requeue_is_logged_and_sets_the_exit_code(caplog, capsys, command, timeout, reason):
    with caplog.at_level(logging.ERROR, logger="ldm.train.preemption"):
        assert run_requeue(command, timeout=timeout) is False
    assert reason in caplog.text and "will not restart by itself" in caplog.text
    assert f"error: requeue command failed ({reason}" in capsys.readouterr().err
    assert exit_code("requeue", False) == 1


def test_requeue_command_survives_the_sigterm_of_the_requeue(caplog):
    """`scontrol requeue` makes SLURM SIGTERM every process of the job, the command's own among them: that is the
    requeue happening, not a failure (it was reported as "exited -15")."""
    handler = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.ERROR, logger="ldm.train.preemption"):
        assert run_requeue("kill -TERM $$; echo requeued", timeout=30) is True
    assert "failed" not in caplog.text
    assert signal.getsignal(signal.SIGTERM) is handler  # this process's handler is back


def test_exit_code_needs_a_stop():
    with pytest.raises(ValueError):
        exit_code("", None)


AGREE = textwrap.dedent("""
    import os, signal, torch
    from ldm.train.preemption import StopRequest, agreed_action
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    stop = StopRequest()
    sent = os.environ["SIGNALS"].split(",")[rank]
    if sent:
        os.kill(os.getpid(), getattr(signal, sent))
    print(f"rank {rank}: {agreed_action(stop) or 'go on'}")
    torch.distributed.destroy_process_group()
""")


@pytest.mark.distributed
def test_ranks_agree_on_one_action():
    def run(signals: str) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SIGNALS=signals, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
                   PYTHONPATH=str(ROOT))
        procs = [subprocess.Popen([sys.executable, "-c", AGREE], env={**env, "RANK": str(r)}, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        return sorted(line for out in outs for line in out.splitlines() if line.startswith("rank"))

    assert run(",SIGUSR1") == ["rank 0: requeue", "rank 1: requeue"]  # one rank's warning stops both
    assert run("SIGTERM,SIGUSR1") == ["rank 0: stop", "rank 1: stop"]  # a cancel anywhere: nobody requeues
    assert run(",") == ["rank 0: go on", "rank 1: go on"]
