"""The rectified flow x_t = (1 - t) x0 + t eps: closed forms, its exact velocity field, SD3's time shift."""

import math

import pytest
import torch

from ldm.diffusion import FlowMatching, Predictor, from_x0_eps, resolution_shift, shift_time, to_x0_eps
from tests.sampling.mixture import make_mixture

MIX = make_mixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [0.5, 0.3, 0.7])


def test_flow_process_closed_forms():
    p = FlowMatching(time_scale=1000)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(p.alpha(t), 1 - t) and torch.equal(p.sigma(t), t)
    assert torch.equal(p.d_alpha(t), -torch.ones_like(t)) and torch.equal(p.d_sigma(t), torch.ones_like(t))
    torch.testing.assert_close(p.model_time(t), 1000 * t, rtol=0, atol=0)  # SD3 / diffusers: timestep = 1000 sigma
    torch.testing.assert_close(p.time_from_model(p.model_time(t)), t, rtol=0, atol=1e-15)
    inner = t[1:-1]
    torch.testing.assert_close(p.snr(inner), ((1 - inner) / inner) ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(p.time_from_log_snr_half(p.log_snr_half(inner)), inner, rtol=0, atol=1e-15)
    assert float(p.alpha(1.0)) == 0.0 and float(p.snr(1.0)) == 0.0 and p.t_min == 1e-3
    x = p.prior_sample((20000, 3), torch.Generator().manual_seed(0), dtype=torch.float64)  # N(0, I) exactly
    assert abs(float(x.std()) - 1) < 0.01
    a, var = p.transition(1.0, 0.25)  # the last step forgets x_s
    assert float(a) == 0.0 and float(var) == 1.0


def test_velocity_conversions_are_exact_up_to_the_endpoints():
    """velocity = eps - x0 <-> (x0, eps) with x0 = x_t - t u, eps = x_t + (1 - t) u, also at t = 0 and t = 1."""
    p = FlowMatching()
    t = torch.tensor([0.0, 1e-6, 0.5, 1 - 1e-6, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    alpha, sigma = p.alpha(t), p.sigma(t)
    x_t = p.marginal(x0, t, eps)
    u = from_x0_eps(x0, eps, alpha, sigma, "velocity")
    torch.testing.assert_close(u, eps - x0, rtol=0, atol=0)
    x0_back, eps_back = to_x0_eps(u, x_t, alpha, sigma, "velocity")
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-15)
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-15)
    torch.testing.assert_close(p.ode_velocity(x0_back, eps_back, t), u, rtol=0, atol=1e-15)  # dx_t/dt = eps - x0


def _log_density(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log p_t(x) of the mixture under the flow: sum_k w_k N(x; (1 - t) mu_k, ((1 - t)^2 s_k^2 + t^2) I)."""
    a, d = 1 - t[:, None], MIX.dim  # (B, 1)
    v = a**2 * MIX.stds**2 + t[:, None] ** 2  # (B, K)
    sq = ((x[:, None, :] - a[:, :, None] * MIX.means[None]) ** 2).sum(-1)  # (B, K)
    return (MIX.weights.log() - 0.5 * sq / v - 0.5 * d * torch.log(2 * math.pi * v)).logsumexp(1)


def _closed_form_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """u(x, t) = sum_k r_k(x) [-mu_k + (t - (1 - t) s_k^2) / v_k (x - (1 - t) mu_k)]: per component the velocity of
    N(m_t, v_t I), m_t' + v_t' / (2 v_t) (x - m_t), averaged with the posterior weights (Lipman et al. 2023, Thm. 1)."""
    a = 1 - t[:, None]
    v = a**2 * MIX.stds**2 + t[:, None] ** 2  # (B, K)
    sq = ((x[:, None, :] - a[:, :, None] * MIX.means[None]) ** 2).sum(-1)
    logits = MIX.weights.log() - 0.5 * sq / v - 0.5 * MIX.dim * torch.log(v)
    r = logits.softmax(1)  # (B, K)
    gain = (t[:, None] - a * MIX.stds**2) / v  # (B, K)
    centred = x[:, None, :] - a[:, :, None] * MIX.means[None]  # (B, K, d)
    return (r[..., None] * (-MIX.means[None] + gain[..., None] * centred)).sum(1)


def test_exact_velocity_field_is_the_closed_form_and_solves_the_continuity_equation():
    p = FlowMatching()
    model = Predictor(MIX.denoiser(p, "velocity"), p, "velocity")
    g = torch.Generator().manual_seed(2)
    t = torch.rand(400, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x = p.marginal(MIX.sample(400, g)[0], t, torch.randn(400, 2, generator=g, dtype=torch.float64))
    u = p.ode_velocity(*model(x, t), t)  # the network's velocity through the one parameterisation place
    torch.testing.assert_close(u, _closed_form_velocity(x, t), rtol=1e-10, atol=1e-10)
    # d/dt log p + div u + u . grad log p = 0 (the marginal velocity transports p_t), by autograd
    x, t = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
    logp = _log_density(x, t)
    dlogp_dt, grad_logp = torch.autograd.grad(logp.sum(), (t, x), create_graph=False)
    field = _closed_form_velocity(x, t.detach())
    div = sum(torch.autograd.grad(field[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(2))
    residual = (dlogp_dt + div + (field * grad_logp).sum(1)).detach()
    assert float(residual.abs().max()) < 1e-9, float(residual.abs().max())
    wrong = (dlogp_dt + div + 1.1 * (field * grad_logp).sum(1)).detach()  # the check sees a 10% error in the field
    assert float(wrong.abs().median()) > 1e-3


def test_eps_prediction_is_undefined_at_t_1():
    p = FlowMatching()
    with pytest.raises(ValueError, match="zero SNR"):
        Predictor(lambda x, m, c: torch.zeros_like(x), p, "eps")(torch.zeros(2, 3), 1.0)
    x0, eps = Predictor(lambda x, m, c: torch.ones_like(x), p, "velocity")(torch.zeros(2, 3), 1.0)
    torch.testing.assert_close(x0, -torch.ones(2, 3))  # x0 = x_1 - u, eps = x_1 at t = 1
    torch.testing.assert_close(eps, torch.zeros(2, 3))


def test_time_shift_is_sd3_eq_23_and_shifts_the_log_snr():
    p = FlowMatching()
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 3.0, resolution_shift(1024**2, 256**2)):
        shifted = shift_time(t, s)
        torch.testing.assert_close(shifted, s * t / (1 + (s - 1) * t), rtol=0, atol=0)
        assert float(shifted[0]) == 0.0 and float(shifted[-1]) == 1.0 and bool((shifted[1:] > shifted[:-1]).all())
        # on the flow: sigma/alpha scaled by s, i.e. lambda - log s
        torch.testing.assert_close(p.log_snr_half(shifted[1:-1]), p.log_snr_half(t[1:-1]) - math.log(s),
                                   rtol=0, atol=1e-12)
    assert resolution_shift(1024**2, 256**2) == 4.0
    assert torch.equal(shift_time(t, 1.0), t)
    with pytest.raises(ValueError):
        shift_time(t, 0.0)
