"""The training objective: targets, min-SNR-gamma (Hang et al. 2023) and EDM (Karras et al. 2022) weights, offset noise
(Guttenberg 2023)."""

import pytest
import torch

from ldm.diffusion import (
    PREDICTIONS, VESDE, VPSDE, DiscreteVP, FlowMatching, SubVPSDE, diffusion_loss, loss_weight, make_betas,
)

PROCESSES = {
    "discrete": lambda: DiscreteVP(make_betas("linear", 1000)),
    "zsnr": lambda: DiscreteVP(make_betas("scaled_linear", 1000, zero_terminal_snr=True)),
    "vp": VPSDE,
    "subvp": SubVPSDE,
    "ve": VESDE,
    "flow": FlowMatching,
}


def test_min_snr_weights_are_hang_et_al_formulas():
    """VP: eps min(SNR, g) / SNR, v min(SNR, g) / (SNR + 1), x0 min(SNR, g) (Hang et al. 2023, Eq. 9 / their code)."""
    snr = torch.tensor([0.0, 1e-3, 0.5, 4.9, 5.0, 5.1, 80.0, 1e4], dtype=torch.float64)
    gamma = 5.0
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    eps = torch.where(snr > 0, clipped / snr, torch.ones_like(snr))  # the SNR -> 0 limit is 1
    torch.testing.assert_close(loss_weight(snr, "eps", "min_snr", gamma), eps, rtol=1e-15, atol=0)
    torch.testing.assert_close(loss_weight(snr, "v", "min_snr", gamma), clipped / (snr + 1), rtol=1e-15, atol=0)
    torch.testing.assert_close(loss_weight(snr, "x0", "min_snr", gamma), clipped, rtol=1e-15, atol=0)
    torch.testing.assert_close(loss_weight(snr, "score", "min_snr", gamma), eps / (snr + 1), rtol=1e-15, atol=0)
    # velocity = eps - x0: a^2 / (a + s)^2 = SNR / (1 + sqrt(SNR))^2 of the eps-space weight
    torch.testing.assert_close(loss_weight(snr, "velocity", "min_snr", gamma), eps * snr / (1 + snr.sqrt()) ** 2,
                               rtol=1e-12, atol=1e-300)
    for prediction in PREDICTIONS:
        assert torch.equal(loss_weight(snr, prediction), torch.ones_like(snr))
    with pytest.raises(ValueError):
        loss_weight(snr, "eps", "p2")


@pytest.mark.parametrize("weighting", ["min_snr", "edm"])
@pytest.mark.parametrize("name", PROCESSES)
def test_weightings_are_one_objective_in_every_parameterisation(name, weighting):
    """For the same prediction error at fixed x_t, weight x target-MSE is the eps-space weight x eps-MSE in every
    parameterisation and process (the VP formulas alone are wrong where alpha^2 + sigma^2 != 1: sub-VP, VE):
    min(SNR, g) / SNR for min-SNR, lambda(sigma) / SNR = 1 + sigma^2 / sigma_data^2 for EDM."""
    p = PROCESSES[name]()
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.97], dtype=torch.float64)
    alpha, sigma = p.alpha(t)[:, None], p.sigma(t)[:, None]
    g = torch.Generator().manual_seed(0)
    x0, eps, d_eps = (torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(3))
    x_t = alpha * x0 + sigma * eps
    eps_hat = eps + d_eps
    x0_hat = (x_t - sigma * eps_hat) / alpha  # the same wrong prediction, seen as an x0
    targets = lambda x0, eps: {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "score": -eps / sigma,  # noqa: E731
                               "velocity": eps - x0}
    true, wrong = targets(x0, eps), targets(x0_hat, eps_hat)
    snr = p.snr(t)
    eps_weight = (5.0 / snr).clamp(max=1.0) if weighting == "min_snr" else 1 + 1 / (snr * 0.5**2)
    reference = eps_weight * d_eps.pow(2).mean(1)
    for prediction in PREDICTIONS:
        w = loss_weight(snr, prediction, weighting, scale2=(alpha**2 + sigma**2)[:, 0])
        torch.testing.assert_close(w * (wrong[prediction] - true[prediction]).pow(2).mean(1), reference,
                                   rtol=1e-9, atol=0, msg=prediction)


def _recording_loss(process, prediction, weighting, offset_noise=0.0, shape=(64, 4, 4, 4), seed=0):
    """diffusion_loss with a network that records (x_t, model time) and predicts zeros."""
    seen = {}

    def zero_net(x, m, cond):
        seen["x_t"], seen["m"] = x.clone(), m.clone()
        return torch.zeros_like(x)

    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    loss = diffusion_loss(zero_net, x0, None, process, prediction=prediction, weighting=weighting,
                          offset_noise=offset_noise, generator=torch.Generator().manual_seed(seed))
    return loss, x0, seen


@pytest.mark.parametrize("weighting", ["uniform", "min_snr", "edm"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", ["discrete", "subvp", "ve", "flow"])
def test_diffusion_loss_is_the_weighted_target_mse(name, prediction, weighting):
    p = PROCESSES[name]()
    loss, x0, seen = _recording_loss(p, prediction, weighting)
    t = p.time_from_model(seen["m"].double())
    if name == "discrete":  # discrete training times are knots: model time is the integer timestep
        torch.testing.assert_close(seen["m"].double(), seen["m"].double().round(), rtol=0, atol=0)
    alpha, sigma = p.alpha(t).view(-1, 1, 1, 1), p.sigma(t).view(-1, 1, 1, 1)
    eps = (seen["x_t"] - alpha * x0) / sigma  # the noise the loss drew
    assert abs(float(eps.std()) - 1) < 0.05
    target = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "score": -eps / sigma,
              "velocity": eps - x0}[prediction]
    w = loss_weight(p.snr(t), prediction, weighting, scale2=(alpha**2 + sigma**2).flatten())
    expected = (w * target.pow(2).flatten(1).mean(1)).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)  # the MSE itself runs in float32


def test_offset_noise_adds_a_per_channel_constant():
    """eps = z + c z_c: channel means get variance 1/HW + c^2, deviations from them stay N(0, 1 - 1/HW)."""
    p = PROCESSES["ve"]()  # alpha = 1: the noise is (x_t - x0) / sigma exactly
    for offset in (0.0, 0.5):
        _, x0, seen = _recording_loss(p, "eps", "uniform", offset_noise=offset, shape=(4096, 4, 4, 4))
        sigma = p.sigma(p.time_from_model(seen["m"].double())).view(-1, 1, 1, 1)
        eps = (seen["x_t"] - x0) / sigma
        channel_mean = eps.mean((2, 3))  # (B, C)
        assert abs(float(channel_mean.var()) / (1 / 16 + offset**2) - 1) < 0.05, (offset, float(channel_mean.var()))
        deviation = eps - channel_mean[..., None, None]
        assert abs(float(deviation.var()) / (15 / 16) - 1) < 0.02
        corr = torch.corrcoef(channel_mean.T)  # independent across channels
        assert float((corr - torch.eye(4, dtype=corr.dtype)).abs().max()) < 0.06
