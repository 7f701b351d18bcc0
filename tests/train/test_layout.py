"""What makes training independent of the process layout, checked without processes: per-sample noise and the
data position re-placed for a checkpoint written by another world size or micro-batch."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ldm.assemble import build_process
from ldm.conditioning import conditioning_dropout
from ldm.config import LDMConfig
from ldm.diffusion import diffusion_loss
from ldm.diffusion.rng import sample_generators
from ldm.data.run_stream import DataPosition


def _stub(world: int, micro: int, step: int = 7, per_epoch: int = 100):
    messages = []
    return SimpleNamespace(seed=0, rollbacks=0, step=step, world=world, micro=micro,
                           position=DataPosition(per_epoch), messages=messages)


def _replace_position(stub, state: dict) -> int:
    """The micro-batches of the epoch a stub trainer skips when resuming from ``state``."""
    warning = stub.position.restore(state, stub.world, stub.micro)
    if warning:
        stub.messages.append(warning)
    return stub.position.consumed


def test_per_sample_noise_does_not_depend_on_the_batch_split():
    """Loss terms and dropout of a sample are the same whether it is trained in one batch of 4 or two of 2."""
    trainer = _stub(1, 4)
    process = build_process(LDMConfig().diffusion)
    keys = ["a", "b", "c", "d"]
    x0 = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    cond = {"context": torch.randn(4, 3, 5), "context_mask": torch.ones(4, 3, dtype=torch.bool)}
    null = {"context": torch.zeros(1, 3, 5), "context_mask": torch.ones(1, 3, dtype=torch.bool)}

    def denoiser(x, t, c):  # depends on x_t, t and the condition, so noise, time and dropout all show
        return x * 0.5 + t.view(-1, 1, 1, 1) * 1e-3 + c["context"].mean((1, 2)).view(-1, 1, 1, 1)

    def loss(rows):
        gens = sample_generators([keys[i] for i in rows], trainer.seed, trainer.rollbacks, trainer.step)
        c = conditioning_dropout({k: v[rows] for k, v in cond.items()}, null, 0.5, gens)
        return diffusion_loss(denoiser, x0[rows], c, process, generator=gens)

    whole = loss([0, 1, 2, 3])
    halves = (loss([0, 1]) + loss([2, 3])) / 2
    torch.testing.assert_close(whole, halves, rtol=1e-6, atol=0)
    trainer.step = 8  # the next step draws new noise for the same samples
    assert not torch.allclose(loss([0, 1, 2, 3]), whole)


def test_data_position_replaced_for_another_layout():
    same = _stub(2, 4)
    assert _replace_position(same, {"epoch": 3, "epoch_batches": 10, "world_size": 2, "micro_batch": 4}) == 10
    assert same.messages == []
    # 10 batches x 2 processes x 4 = 80 samples of the epoch consumed: 1 process x 8 skips 10 batches
    one = _stub(1, 8)
    assert _replace_position(one, {"epoch": 3, "epoch_batches": 10, "world_size": 2, "micro_batch": 4}) == 10
    assert "2 processes x micro-batch 4" in one.messages[0] and "epoch 3" in one.messages[0]
    four = _stub(4, 4, per_epoch=1)  # never beyond the epoch's end
    assert _replace_position(four, {"epoch": 0, "epoch_batches": 10, "world_size": 1, "micro_batch": 4}) == 1
