"""Score-matching objectives against the Fisher divergence to the closed-form score of a Gaussian mixture.

Denoising and sliced score matching both equal 1/2 E_t sigma_t^2 E_{p_t} ||s - grad log p_t||^2 / D plus a constant
that does not depend on the network (Vincent 2011; Hyvarinen 2005 with Hutchinson's trace estimate), so for two score
functions evaluated on the same draws the difference of the losses is half the difference of Fisher divergences.
Training briefly with either objective then drives the Fisher divergence down; the UNet passes a training step
through the double backward sliced score matching needs; the config refuses combinations that are not these losses.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ldm.assemble import build_objective, build_process
from ldm.config import ConfigError, LDMConfig, load_config
from ldm.diffusion import VESDE, DiscreteVE, dsm_loss, ssm_loss
from ldm.diffusion.score_matching import perturb
from tests.sampling.mixture import make_mixture

MIX = make_mixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [0.5, 0.3, 0.7])
LOSSES = {"dsm": dsm_loss, "ssm": ssm_loss}


def fisher(score_fn, process, x0: torch.Tensor, seed: int) -> torch.Tensor:
    """E_t sigma^2 ||s - grad log p_t||^2 / D on the draws (t, x_t) the objectives take from the same seed."""
    t, sigma, _, x_t = perturb(x0, process, torch.Generator().manual_seed(seed))
    m = process.model_time(t)
    with torch.no_grad():
        diff = score_fn(x_t, m, None).double() - MIX.denoiser(process, "score")(x_t, m, None)  # (B, 2)
    return (sigma[:, None] ** 2 * diff.pow(2)).mean()


@pytest.mark.parametrize("name", LOSSES)
def test_loss_differences_are_half_the_fisher_differences(name, one_thread):
    """loss(s) - loss(exact score) = 1/2 Fisher(s) on common draws, within 4 standard errors over 30 batches."""
    p = VESDE(sigma_min=0.05, sigma_max=5.0)
    exact = MIX.denoiser(p, "score")

    def wrong(x, m, cond):  # a biased, mis-scaled score: Fisher divergence ~0.1
        return 0.7 * exact(x, m, cond) + 0.2

    residuals, half_fisher = [], []
    for k in range(30):
        x0, _ = MIX.sample(2000, torch.Generator().manual_seed(100 + k))
        gap = LOSSES[name](wrong, x0, None, p, generator=torch.Generator().manual_seed(k)) \
            - LOSSES[name](exact, x0, None, p, generator=torch.Generator().manual_seed(k))
        half_fisher.append(0.5 * float(fisher(wrong, p, x0, k)))
        residuals.append(float(gap.detach()) - half_fisher[-1])
    r = torch.tensor(residuals)
    standard_error = float(r.std()) / math.sqrt(len(r))
    assert abs(float(r.mean())) < 4 * standard_error, (float(r.mean()), standard_error)
    assert 4 * standard_error < 0.1 * sum(half_fisher) / len(half_fisher)  # precise enough to see a 10% error


class ScoreMLP(nn.Module):
    """s(x, log sigma) = net(x, log sigma) / sigma, NCSN's 1/sigma output scaling (Song & Ermon 2020, Sec. 3.3)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def forward(self, x, m, cond=None):  # VE processes pass m = log sigma
        return self.net(torch.cat([x, m[:, None].to(x)], 1)) / m.exp()[:, None].to(x)  # (B, 2)


@pytest.mark.parametrize("name,process", [("dsm", lambda: DiscreteVE(0.05, 5.0, levels=10)),  # NCSN's L levels
                                          ("ssm", lambda: VESDE(0.05, 5.0))],  # continuous VE
                         ids=["dsm-ncsn", "ssm-ve"])
def test_brief_training_reduces_fisher_divergence(name, process, one_thread):
    p = process()
    torch.manual_seed(0)
    net = ScoreMLP()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x_eval, _ = MIX.sample(4000, torch.Generator().manual_seed(123))
    before = float(fisher(lambda x, m, c: net(x.float(), m.float()), p, x_eval, 123))
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        x0, _ = MIX.sample(256, g)
        loss = LOSSES[name](net, x0.float(), None, p, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = float(fisher(lambda x, m, c: net(x.float(), m.float()), p, x_eval, 123))
    assert after < 0.15 * before, (before, after)


def test_objectives_are_reproducible_from_the_generator():
    p = DiscreteVE(levels=10)
    x0, _ = MIX.sample(64, torch.Generator().manual_seed(0))
    net = ScoreMLP().double()
    for fn in LOSSES.values():
        a, b = (fn(net, x0, None, p, generator=torch.Generator().manual_seed(5)) for _ in range(2))
        assert torch.equal(a, b)
        per_sample = [torch.Generator().manual_seed(i) for i in range(64)]  # the trainer's per-sample generators
        c = fn(net, x0, None, p, generator=per_sample)
        assert torch.isfinite(c) and not torch.equal(a, c)


def test_config_selects_objective_and_refuses_what_is_not_score_matching():
    base = ["diffusion.prediction=score", "diffusion.process=ncsn", "diffusion.num_timesteps=10"]
    for objective in ("dsm", "ssm"):
        cfg = load_config(LDMConfig, None, [*base, f"diffusion.objective={objective}"])
        p = build_process(cfg.diffusion)
        assert isinstance(p, DiscreteVE) and p.levels == 10
        x0, _ = MIX.sample(32, torch.Generator().manual_seed(0))
        net = ScoreMLP().double()
        loss = build_objective(cfg.diffusion, p)(net, x0, None, torch.Generator().manual_seed(3))
        assert torch.equal(loss, LOSSES[objective](net, x0, None, p, generator=torch.Generator().manual_seed(3)))
    refused = {
        "diffusion.prediction": ["diffusion.objective=dsm", "diffusion.prediction=eps"],
        "diffusion.weighting": [*base, "diffusion.objective=ssm", "diffusion.weighting=min_snr"],
        "diffusion.offset_noise": [*base, "diffusion.objective=dsm", "diffusion.offset_noise=0.1"],
        "diffusion.num_timesteps": ["diffusion.process=ncsn", "diffusion.num_timesteps=1"],
        "diffusion.objective": ["diffusion.objective=ism"],
    }
    for key, overrides in refused.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(LDMConfig, None, overrides)


def test_sliced_score_matching_trains_the_unet_plain_and_in_deepspeed(one_thread):
    """One ssm step on the tiny cross-attention UNet: the double backward reaches every weight, finite; inside a
    DeepSpeed engine (ZeRO 0, 2 accumulation steps, the trainer's config) the same loss gives the plain gradients / 2
    (the engine hooks its outputs' backward; the inner projection gradient must not be caught by those hooks)."""
    import copy

    import deepspeed

    from ldm.config import TrainConfig
    from ldm.models import UNet, unet_preset
    from ldm.pipeline import unet_denoiser
    from ldm.train.distributed import init_distributed
    from ldm.train.engine import deepspeed_config

    torch.manual_seed(0)
    unet = UNet(**{**unet_preset("tiny"), "in_channels": 4, "out_channels": 4, "context_dim": 32})
    engine_unet = copy.deepcopy(unet)
    cfg = load_config(LDMConfig, None, ["diffusion.prediction=score", "diffusion.process=ve",
                                        "diffusion.objective=ssm"]).diffusion
    objective = build_objective(cfg, build_process(cfg))
    z, cond = torch.randn(2, 4, 8, 8), {"context": torch.randn(2, 5, 32)}  # (B, C, h, w), (B, L, D)

    loss = objective(unet_denoiser(unet), z, cond, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [prm.grad for prm in unet.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0

    init_distributed("cpu")
    train = TrainConfig(grad_accum=2, zero_stage=0, precision="fp32")
    engine, *_ = deepspeed.initialize(model=engine_unet, model_parameters=list(engine_unet.parameters()),
                                      config=deepspeed_config(train, micro_batch=2))
    engine_loss = objective(unet_denoiser(engine), z, cond, torch.Generator().manual_seed(0))
    engine.backward(engine_loss)
    torch.testing.assert_close(engine_loss, loss, rtol=1e-6, atol=1e-6)
    for g, prm in zip(grads, engine.module.parameters()):
        torch.testing.assert_close(prm.grad * 2, g, rtol=1e-4, atol=1e-5)
