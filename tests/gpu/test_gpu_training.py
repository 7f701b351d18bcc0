"""One-GPU training through `ldm-train` under DeepSpeed ZeRO-2 bf16: the loss falls, a checkpoint resumes
exactly, bf16 losses track fp32, and the reductions of an NCCL group run on the GPU."""

from __future__ import annotations

import contextlib
import io
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import resumed_line
from tests.gpu.conftest import CONFIG, DEVICE, IMAGE_SIZE, needs_gpu

pytestmark = needs_gpu
STEPS, WINDOW = 30, 10  # "step 30: loss" is the mean of steps 21-30
# bf16 against fp32, same seed, data and noise: step 1 differs only by bf16 arithmetic in the forward
# (weights rounded to bf16, bf16 activations): within 2 %; after 30 steps the trajectories have drifted
# apart by bf16 updates too: the mean loss of steps 21-30 within 5 %.
BF16_STEP1_RTOL, BF16_FINAL_RTOL = 0.02, 0.05


def run_printed(assets, out, *extra: str) -> str:
    """Run ldm-train in this process; returns what it printed."""
    from bench.offline_assets import training_overrides
    from ldm.cli.train import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main(["--config", CONFIG, *training_overrides(assets["shards"], assets["autoencoder"],
                                                           assets["text_encoder"], out, IMAGE_SIZE,
                                                           f"run.device={DEVICE}", *extra)])
    printed = buffer.getvalue()
    assert rc == 0, printed[-3000:]
    return printed


def train(assets, out, *extra: str) -> dict[int, float]:
    """Run ldm-train in this process; returns the printed losses {step: loss}."""
    printed = run_printed(assets, out, *extra)
    return {int(s): float(v) for s, v in re.findall(r"^step (\d+): loss ([0-9.]+)", printed, re.M)}


def thirty_steps(assets, out, precision: str) -> dict[int, float]:
    return train(assets, out, f"train.precision={precision}", "train.zero_stage=2", f"train.max_steps={STEPS}",
                 f"train.log_every={WINDOW}", f"train.ckpt_every={STEPS}")


@pytest.fixture(scope="module")
def bf16_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "run"
    return out, thirty_steps(assets, out, "bf16")


def test_zero2_bf16_loss_falls(bf16_run):
    out, losses = bf16_run
    assert set(losses) == {1, STEPS}, losses
    assert losses[STEPS] < 0.9 * losses[1], losses
    assert (out / "export" / "unet_ema.safetensors").exists()


def test_bf16_losses_track_fp32(assets, bf16_run, tmp_path):
    bf16, fp32 = bf16_run[1], thirty_steps(assets, tmp_path / "fp32", "fp32")
    assert bf16[1] == pytest.approx(fp32[1], rel=BF16_STEP1_RTOL), (bf16, fp32)
    assert bf16[STEPS] == pytest.approx(fp32[STEPS], rel=BF16_FINAL_RTOL), (bf16, fp32)


def test_zero2_bf16_checkpoint_resumes_exactly(assets, tmp_path, trained_steps):
    """Steps 4-6 (only those) resumed from the step-3 checkpoint give bit-identical weights (deterministic kernels
    on)."""
    run = ("train.precision=bf16", "train.zero_stage=2", "train.max_steps=6", "train.ckpt_every=3")
    torch.use_deterministic_algorithms(True)
    try:
        straight = tmp_path / "straight"
        train(assets, straight, *run)
        resumed = tmp_path / "resumed"
        shutil.copytree(straight / "checkpoints", resumed / "checkpoints",
                        ignore=lambda d, names: [n for n in names if n == "step00000006"])
        (resumed / "checkpoints" / "latest").write_text("step00000003\n")
        trained_steps.clear()
        printed = run_printed(assets, resumed, *run)
    finally:
        torch.use_deterministic_algorithms(False)
    assert resumed_line(resumed / "checkpoints", 3) in printed and trained_steps == [4, 5, 6]
    for name in ("unet.safetensors", "unet_ema.safetensors"):
        a, b = load_file(str(straight / "export" / name)), load_file(str(resumed / "export" / name))
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, (name, differ[:5])


def test_reductions_run_where_the_group_serves():
    """Under NCCL (CUDA) an all-reduce of a CPU tensor fails; the project's reductions run on the GPU."""
    from ldm.train.distributed import group_device_types, init_distributed, reduce_scalar, reduction_device

    init_distributed(DEVICE)  # joins the group the trainer made, or makes a world of one
    device = reduction_device()
    assert device.type in group_device_types()
    assert float(reduce_scalar(True, "max")) == 1.0
    if torch.distributed.get_backend() == "nccl":
        assert group_device_types() == ["cuda"] and device.type == "cuda"
        flag = torch.tensor(True, device="cuda")
        assert reduce_scalar(flag, "max").device.type == "cuda"  # a GPU flag is reduced on the GPU
        with pytest.raises(RuntimeError):
            torch.distributed.all_reduce(torch.zeros(1))  # what any_across_ranks did before
            torch.cuda.synchronize()
