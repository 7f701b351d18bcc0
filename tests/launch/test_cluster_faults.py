"""Faults on two hosts, each with nothing lost and no rank left waiting: a rank SIGKILLed mid-step, the link cut,
a kill during a checkpoint write, a disk that fills during a checkpoint. Every other rank and both launchers exit
non-zero within a measured bound, `latest` names a complete checkpoint, and a resume trains to the reference run's
weights bit for bit (or, on another world size, continues)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ldm.train.checkpoint import PARTIAL
from ldm.train.distributed import free_port
from tests.launch.cluster import (STEPS, bitwise_equal, checkpoint_weights, cluster_args, export_weights,
                                  kill_pid, latest_tag, run_processes, seconds_until_all_exit, train_env, wait_for,
                                  workers)
from tests.launch.test_cluster_hosts import node_log, run_nodes, start_node

pytestmark = pytest.mark.cluster
EXIT_BOUND = 30  # seconds for every rank and launcher to exit once a peer is known dead (README "On a cluster")
COLLECTIVE_TIMEOUT_MIN = 1  # DEEPSPEED_TIMEOUT: a collective waiting on a silent peer fails after 1 minute


def complete(out: Path, tag: str, world: int = 2) -> None:
    """Checkpoint `tag` holds every rank's files and reads back whole."""
    names = {p.name for p in (out / "checkpoints" / tag).iterdir()}
    for rank in range(world):
        assert {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"ema_rank{rank}.safetensors",
                f"trainer_rank{rank}.pt"} <= names, names
    weights = checkpoint_weights(out, tag)
    assert weights["raw"] and weights["ema"]


def start_both(hosts, out: Path, args: list[str], **env: str) -> list[subprocess.Popen]:
    port = free_port()
    return [start_node(hosts, i, port, out, args, env=train_env(**env)) for i in (0, 1)]


def stop_run(hosts, out: Path, procs: list[subprocess.Popen]) -> None:
    """SIGKILL whatever is left of the run (launchers and workers on both hosts) and reap the launchers."""
    for h in hosts.hosts:
        for pid in run_processes(h, out):
            kill_pid(pid)
    for p in procs:
        if p.poll() is None:
            kill_pid(p.pid)
        p.wait()


def freeze(pids: list[int]) -> None:
    for pid in pids:
        kill_pid(pid, signal.SIGSTOP)


def thaw(pids: list[int]) -> None:
    for pid in pids:
        kill_pid(pid, signal.SIGCONT)


def test_rank_killed_mid_step(hosts, reference, tmp_path, tiny_shards, tiny_autoencoder):
    out = tmp_path / "run"
    procs = start_both(hosts, out, cluster_args(tiny_shards, tiny_autoencoder, out))
    try:
        wait_for(lambda: (out / "checkpoints" / "latest").exists(), 600, "the first checkpoint", procs)
        [victim], [survivor] = workers(hosts[1], out), workers(hosts[0], out)
        freeze([victim, survivor])  # both stopped wherever they are in the step
        kill_pid(victim)
        thaw([survivor])
        elapsed = seconds_until_all_exit(procs, EXIT_BOUND)
    finally:
        stop_run(hosts, out, procs)
    print(f"rank 1 SIGKILLed: every rank and launcher exited within {elapsed:.1f} s")
    logs = [node_log(out, i).read_text() for i in (0, 1)]
    assert all(p.returncode != 0 for p in procs), logs
    assert "rank      : 1 (local_rank: 0)" in logs[1] and "Signal 9 (SIGKILL)" in logs[1], logs[1][-3000:]
    assert not workers(hosts[0], out) and not workers(hosts[1], out)
    tag = latest_tag(out)
    complete(out, tag)
    run_nodes(hosts, out, cluster_args(tiny_shards, tiny_autoencoder, out))
    assert bitwise_equal(export_weights(out), export_weights(reference)) == []


def test_link_cut_mid_run(hosts, reference, tmp_path, tiny_shards, tiny_autoencoder):
    out = tmp_path / "run"
    procs = start_both(hosts, out, cluster_args(tiny_shards, tiny_autoencoder, out),
                       DEEPSPEED_TIMEOUT=str(COLLECTIVE_TIMEOUT_MIN))
    try:
        wait_for(lambda: (out / "checkpoints" / "latest").exists(), 600, "the first checkpoint", procs)
        hosts[1].link(False)
        elapsed = seconds_until_all_exit(procs, 60 * COLLECTIVE_TIMEOUT_MIN + EXIT_BOUND)
    finally:
        hosts[1].link(True)
        stop_run(hosts, out, procs)
    print(f"link cut: every rank and launcher exited within {elapsed:.1f} s")
    logs = [node_log(out, i).read_text() for i in (0, 1)]
    assert all(p.returncode != 0 for p in procs), logs
    tag = latest_tag(out)
    complete(out, tag)
    run_nodes(hosts, out, cluster_args(tiny_shards, tiny_autoencoder, out))
    assert bitwise_equal(export_weights(out), export_weights(reference)) == []


def test_kill_during_checkpoint_write(hosts, tmp_path, tiny_shards, tiny_autoencoder):
    """Every process of the job SIGKILLed while a checkpoint is being written (a power cut), then the run resumes on
    one host: `latest` never names a partial checkpoint, every checkpoint left holds the files of one write, and the
    two hosts resume from the one host's rewrite of the killed step. (Before: the rewrite went into the half-written
    folder, next to the killed write's rank-1 ZeRO shard, and the two-host resume failed re-partitioning it.)"""
    out = tmp_path / "run"
    root = out / "checkpoints"
    args = cluster_args(tiny_shards, tiny_autoencoder, out)
    procs = start_both(hosts, out, args)

    def being_written() -> str | None:
        """`latest` while a later checkpoint is half written (rank 1 has begun writing its files)."""
        latest = latest_tag(out) if (root / "latest").exists() else ""
        for step in range(4, STEPS + 1, 2):
            started = [f for d in root.glob(f"*step{step:08d}*") for f in d.glob("*rank*1*")]
            if started and latest != f"step{step:08d}":
                return latest
        return None

    try:
        while True:
            before = wait_for(being_written, 600, "a checkpoint write", procs, interval=0.002)
            pids = [p for h in hosts.hosts for p in run_processes(h, out)]
            freeze(pids)
            if latest_tag(out) == before:  # stopped mid-write: the pointer still names the previous one
                break
            thaw(pids)  # the write ended before the stop: catch the next one
        for pid in pids:
            kill_pid(pid)
        thaw(pids)
        seconds_until_all_exit(procs, 30)
    finally:
        stop_run(hosts, out, procs)
    partial = sorted(p.name for p in root.iterdir() if p.name > before and p.name.startswith("step"))
    print(f"killed while writing {partial} (latest: {before})")
    assert partial, "nothing was being written"
    killed = partial[0].removesuffix(PARTIAL)
    complete(out, before)
    [log] = run_nodes(hosts, out, args, nodes=(0,))
    assert f"resumed from {root / before}" in log
    for tag in sorted(p.name for p in root.glob("step*")):
        state = checkpoint_weights(out, tag)  # reads back whole: no file of the killed write is mixed in
        assert state["raw"], tag
        names = {p.name for p in (root / tag).iterdir()}
        world = 1 if tag > before else 2
        assert not any(f"rank{world}" in n or f"rank_{world}" in n for n in names), (tag, names)
    # both hosts back: they resume from the step the kill interrupted, written again by one host (world size 1 -> 2)
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / killed, again / "checkpoints" / killed)
    (again / "checkpoints" / "latest").write_text(killed + "\n")
    logs = run_nodes(hosts, again, cluster_args(tiny_shards, tiny_autoencoder, again))
    assert f"resumed from {again / 'checkpoints' / killed}" in logs[0]


def test_disk_full_during_checkpoint(hosts, reference, tmp_path, tiny_shards, tiny_autoencoder):
    out = tmp_path / "run"  # the output folder is a small disk of its own
    out.mkdir()
    ckpt = sum(p.stat().st_size for p in (reference / "checkpoints" / latest_tag(reference)).iterdir())
    overhead = sum(p.stat().st_size for p in reference.iterdir() if p.is_file())
    size = overhead + int(2.5 * ckpt) + (1 << 20)  # room for two checkpoints (steps 2 and 4), not for a third
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "ldm25-disk", str(out)], check=True)
    try:
        procs = start_both(hosts, out, cluster_args(tiny_shards, tiny_autoencoder, out))
        try:
            wait_for(lambda: any(p.poll() is not None for p in procs), 900, "the failed checkpoint write")
            elapsed = seconds_until_all_exit(procs, EXIT_BOUND)  # after the first launcher exited
        finally:
            stop_run(hosts, out, procs)
        logs = [node_log(out, i).read_text() for i in (0, 1)]
        error = re.search(r"error: checkpoint step00000006 could not be written under .*", logs[0] + logs[1])
        print(f"disk full: every rank and launcher exited within {elapsed:.1f} s of the first; {error and error[0]}")
        assert all(p.returncode != 0 for p in procs), logs
        assert error and "MiB free there now" in error[0] and "last complete checkpoint is step00000004" in error[0]
        assert latest_tag(out) == "step00000004"
        complete(out, "step00000004")
        assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == \
            ["step00000002", "step00000004"]  # the partial write was removed: its space is free again
        subprocess.run(["mount", "-o", f"remount,size={size * 8}", str(out)], check=True)
        run_nodes(hosts, out, cluster_args(tiny_shards, tiny_autoencoder, out))
        assert bitwise_equal(export_weights(out), export_weights(reference)) == []
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)
