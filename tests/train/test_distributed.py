"""DeepSpeed with two processes (gloo): ranks agree on the weights; kill -9 mid-epoch and resume reproduces the
uninterrupted run bit for bit; 2 processes x micro-batch b train what 1 process x 2b trains, under ZeRO 0, 2 and 3;
a 2-process ZeRO-3 checkpoint resumes on 1 process (power EMAs re-partitioned); ZeRO-3 partitions (weights, EMA and
power EMA snapshots) consolidate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, tiny_ldm_overrides

# 6 optimizer steps of 2 micro-batches (3 samples each) per rank; a data epoch is 5 micro-batches, so the
# checkpoint at step 3 (6 micro-batches) sits one batch into epoch 1: resume must continue mid-epoch
RUN = ("train.max_steps=6", "train.ckpt_every=3", "train.grad_accum=2", "data.batch_size=3",
       "data.batches_per_epoch=5", "train.log_every=100", "sampling.steps=2")


def launch(out, shards, autoencoder, *extra) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHON"] = sys.executable
    cmd = ["bash", str(ROOT / "launch/local.sh"), "-n", "2", "--config", str(ROOT / "configs/ldm/emoji.yaml"),
           *tiny_ldm_overrides(shards, autoencoder, out, None), *RUN, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


def run_to_end(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return out


def assert_same_weights(a_dir, b_dir) -> None:
    for name in ("unet.safetensors", "unet_ema.safetensors"):
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, tiny_shards, tiny_autoencoder):
    out = tmp_path_factory.mktemp("zero2") / "run"
    run_to_end(launch(out, tiny_shards, tiny_autoencoder, "train.zero_stage=2"))
    return out


@pytest.mark.distributed
def test_zero2_ranks_agree(zero2_run):
    folder = zero2_run / "checkpoints" / "step00000006"
    states = [torch.load(folder / f"trainer_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert states[0]["param_digest"] is not None and states[0]["param_digest"] == states[1]["param_digest"]
    assert states[0]["samples_seen"] == 6 * 2 * 2 * 3  # steps x ranks x accumulation x micro-batch
    ema, raw = load_file(str(zero2_run / "export" / "unet_ema.safetensors")), load_file(str(zero2_run / "export" / "unet.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # the EMA is its own set of weights


@pytest.mark.distributed
def test_kill9_mid_epoch_and_resume_matches_uninterrupted(tmp_path, zero2_run, tiny_shards, tiny_autoencoder):
    run = tmp_path / "killed"
    proc = launch(run, tiny_shards, tiny_autoencoder, "train.zero_stage=2")
    deadline = time.time() + 600
    while not (run / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the launcher and both ranks
    proc.wait()
    assert not (run / "export").exists()
    state = torch.load(run / "checkpoints" / "step00000003" / "trainer_rank0.pt", weights_only=False)
    assert (state["epoch"], state["epoch_batches"]) == (1, 1)
    out = run_to_end(launch(run, tiny_shards, tiny_autoencoder, "train.zero_stage=2"))
    assert "resumed from" in out
    assert_same_weights(zero2_run / "export", run / "export")


# the same 6 optimizer steps of 2 accumulated micro-batches on one fixed sequence of global micro-batches of 4
# (tests/train/equivalence_worker.py): rank r of W takes rows [r*b, (r+1)*b) of each
# (+ power EMAs of two widths, snapshotted at steps 2, 4, 6)
FIXED = ("train.max_steps=6", "train.ckpt_every=3", "train.grad_accum=2", "train.log_every=100", "sampling.steps=2",
         "train.power_ema=[0.05, 0.1]", "train.power_ema_snapshot_every=2")


def run_fixed(out, shards, autoencoder, nproc: int, *extra) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
           str(nproc), "-m", "tests.train.equivalence_worker", "4", *tiny_ldm_overrides(shards, autoencoder, out, None),
           *FIXED, f"data.batch_size={4 // nproc}", *extra]
    return run_to_end(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                       cwd=ROOT, start_new_session=True))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def norm(tensors: dict) -> float:
    """L2 norm over all entries of a state dict."""
    return float(torch.sqrt(sum(t.double().pow(2).sum() for t in tensors.values())))


def final_weights(run) -> dict[str, dict]:
    return {n: load_file(str(run / "export" / f"{n}.safetensors")) for n in ("unet", "unet_ema")}


@pytest.fixture(scope="module")
def fixed_runs(tmp_path_factory, tiny_shards, tiny_autoencoder):
    """1 process x 4 under ZeRO-0 (the reference), 2 processes x 2 under ZeRO-2 and ZeRO-3."""
    base = tmp_path_factory.mktemp("fixed")
    runs = {"z0x1": base / "z0x1", "z2x2": base / "z2x2", "z3x2": base / "z3x2"}
    logs = {"z0x1": run_fixed(runs["z0x1"], tiny_shards, tiny_autoencoder, 1, "train.zero_stage=0"),
            "z2x2": run_fixed(runs["z2x2"], tiny_shards, tiny_autoencoder, 2, "train.zero_stage=2"),
            "z3x2": run_fixed(runs["z3x2"], tiny_shards, tiny_autoencoder, 2, "train.zero_stage=3")}
    return runs, logs


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["z2x2", "z3x2"])
def test_two_processes_equal_one_process_with_twice_the_batch(fixed_runs, name):
    """Same global batch, same data order, per-sample noise keyed by sample: the layouts train the same model.

    Reductions run in another order (per-rank means, then the all-reduce), so equality is to float32 rounding
    amplified by 6 AdamW steps (Adam turns a rounding-level gradient of a near-zero entry into a step of up to
    lr): the whole difference is bounded against how far the last 3 steps moved the weights, and every entry
    against lr = 5e-4.
    """
    runs, logs = fixed_runs
    final_loss = {n: [line for line in log.splitlines() if line.startswith("step 6: loss")] for n, log in logs.items()}
    assert final_loss[name] == final_loss["z0x1"] and final_loss[name]
    ref, other = final_weights(runs["z0x1"]), final_weights(runs[name])
    at_step3 = torch.load(runs["z0x1"] / "checkpoints" / "step00000003" / "mp_rank_00_model_states.pt",
                          weights_only=False)["module"]
    moved = norm({k: ref["unet"][k] - at_step3[k].float() for k in ref["unet"]})  # steps 4-6 of training
    for kind in ("unet", "unet_ema"):
        gap = norm({k: ref[kind][k] - other[kind][k] for k in ref[kind]})
        assert gap < 1e-2 * moved, (kind, gap, moved)
        assert max_diff(ref[kind], other[kind]) < 2e-4, kind


@pytest.mark.distributed
def test_two_process_zero3_checkpoint_resumes_on_one_process(tmp_path, fixed_runs, tiny_shards, tiny_autoencoder):
    """Resume step 3 of the 2-process ZeRO-3 run on 1 process x 4: steps 4-6 equal the uninterrupted run's."""
    runs, _ = fixed_runs
    run = tmp_path / "resumed"
    shutil.copytree(runs["z3x2"] / "checkpoints", run / "checkpoints",
                    ignore=lambda d, names: [n for n in names if n == "step00000006"])
    (run / "checkpoints" / "latest").write_text("step00000003\n")
    out = run_fixed(run, tiny_shards, tiny_autoencoder, 1, "train.zero_stage=3")
    assert "resumed from" in out and "checkpoint written by 2 processes" in out
    assert (run / "checkpoints" / "step00000003" / "universal" / "done").exists()  # DeepSpeed's universal format
    state = torch.load(run / "checkpoints" / "step00000006" / "trainer_rank0.pt", weights_only=False)
    assert (state["step"], state["world_size"], state["samples_seen"]) == (6, 1, 6 * 2 * 4)
    ref, resumed = final_weights(runs["z3x2"]), final_weights(run)
    for kind in ("unet", "unet_ema"):
        assert max_diff(ref[kind], resumed[kind]) < 1e-5, kind
    # the power EMAs were consolidated and re-partitioned for 1 process; the snapshots after step 3 written again
    from ldm.train.checkpoint import read_power_snapshots

    info = json.loads((run / "checkpoints" / "power_ema" / "step00000004" / "power_ema.json").read_text())
    assert info["ranks"] == 1 and info["partitioned"]
    ref_snaps, got_snaps = (read_power_snapshots(r / "checkpoints")[0] for r in (runs["z3x2"], run))
    assert [(s.step, s.gamma) for s in ref_snaps] == [(s.step, s.gamma) for s in got_snaps] and len(ref_snaps) == 6
    for a, b in zip(ref_snaps, got_snaps):
        assert max_diff(dict(a.tensors()), dict(b.tensors())) < 1e-5, (a.step, a.gamma)


@pytest.mark.distributed
def test_zero3_power_ema_snapshots_consolidate(fixed_runs):
    """Each rank of the 2-process ZeRO-3 run wrote its flat partitions of the power EMAs; consolidated, they are the
    power EMAs of the 1-process run on the same data (to the float32 rounding bound the weights meet above)."""
    from ldm.train.checkpoint import read_power_snapshots

    runs, _ = fixed_runs
    folder = runs["z3x2"] / "checkpoints" / "power_ema" / "step00000004"
    info = json.loads((folder / "power_ema.json").read_text())
    assert info["ranks"] == 2 and info["partitioned"] and info["sigma_rels"] == [0.05, 0.1]
    parts = [load_file(str(folder / f"power_ema_rank{r}.safetensors")) for r in (0, 1)]
    for name, shape in info["shapes"].items():
        key = f"0.05/{name}"
        assert parts[0][key].dim() == 1 and parts[0][key].numel() == parts[1][key].numel()  # equal flat parts
        assert 2 * parts[0][key].numel() >= torch.Size(shape).numel()
    ref, sharded = (read_power_snapshots(runs[n] / "checkpoints")[0] for n in ("z0x1", "z3x2"))
    assert [(s.step, s.gamma) for s in ref] == [(s.step, s.gamma) for s in sharded]
    assert sorted({s.step for s in ref}) == [2, 4, 6]
    at_step3 = torch.load(runs["z0x1"] / "checkpoints" / "step00000003" / "mp_rank_00_model_states.pt",
                          weights_only=False)["module"]
    moved = norm({k: final_weights(runs["z0x1"])["unet"][k] - at_step3[k].float() for k in at_step3})
    for a, b in zip(ref, sharded):
        step, a, b = a.step, dict(a.tensors()), dict(b.tensors())
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        gap = norm({k: a[k] - b[k] for k in a})
        print(f"power EMA snapshot of step {step}: ZeRO-3 x2 vs 1 process: gap {gap:.2e} (steps 4-6 moved "
              f"{moved:.2e}), max {max_diff(a, b):.2e}")
        assert gap < 1e-2 * moved and max_diff(a, b) < 2e-4, (gap, moved)


@pytest.mark.distributed
def test_zero3_partitions_consolidate(tmp_path, fixed_runs):
    """ldm-export rebuilds, from the ZeRO-3 checkpoint files, exactly what the trainer gathered for its export."""
    from ldm.cli.export import main as export_main

    runs, _ = fixed_runs
    assert export_main([str(runs["z3x2"]), "--out", str(tmp_path / "reexport")]) == 0
    assert_same_weights(runs["z3x2"] / "export", tmp_path / "reexport")


def test_launcher_dry_run_prints_command():
    proc = subprocess.run(["bash", str(ROOT / "launch/local.sh"), "-n", "2", "--dry-run", "train.max_steps=5"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    assert "ldm.cli.train" in proc.stdout and "train.max_steps=5" in proc.stdout
    bad = subprocess.run(["bash", str(ROOT / "launch/local.sh"), "-n", "zero"], capture_output=True, text=True)
    assert bad.returncode == 2 and "nproc" in bad.stderr
