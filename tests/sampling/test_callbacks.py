"""Sampler callbacks: callback(i, t, x, x0_hat) once per interval, for every sampler, never changing the results."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import DiscreteVE, DiscreteVP, FlowMatching, Predictor, make_betas
from ldm.sampling import SAMPLERS, sample
from tests.sampling.mixture import make_mixture

MIX = make_mixture([0.5, 0.5], [[-1.5, 0.0], [1.5, 0.5]], [0.4, 0.6])
STEPS = 7


def _model(name: str):
    if name == "annealed_langevin":  # a score sampler on NCSN's levels
        p = DiscreteVE(levels=STEPS)
        return Predictor(MIX.denoiser(p, "score"), p, "score")
    if name in ("euler_maruyama", "pc"):
        p = DiscreteVP(make_betas("linear", 1000))
        return Predictor(MIX.denoiser(p, "eps"), p, "eps")
    p = FlowMatching()  # alpha(1) = 0: the hardest start for every sampler that supports it
    return Predictor(MIX.denoiser(p, "velocity"), p, "velocity")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_sees_every_step_and_changes_nothing(name):
    model = _model(name)
    calls = []

    def callback(i, t, x, x0_hat):
        calls.append((i, t, x.clone(), x0_hat.clone()))

    def run(**options):
        return sample(model, (64, 2), sampler=name, steps=STEPS, generator=torch.Generator().manual_seed(4),
                      dtype=torch.float64, **options)

    plain, watched = run(), run(callback=callback)
    assert torch.equal(plain, watched)  # bit for bit
    assert [c[0] for c in calls] == list(range(STEPS))
    times = [c[1] for c in calls]
    assert all(isinstance(t, float) for t in times) and all(a >= b for a, b in zip(times, times[1:]))
    for _, t, x, x0_hat in calls:  # x0_hat is the model's estimate at the state the callback sees
        assert x.shape == x0_hat.shape == (64, 2) and bool(torch.isfinite(x0_hat).all())
        torch.testing.assert_close(x0_hat, model(x, t)[0], rtol=1e-12, atol=1e-12)
    if name != "annealed_langevin":  # which denoises once more after its last level's Langevin steps
        torch.testing.assert_close(calls[-1][3], plain, rtol=0, atol=0)  # the last estimate is the result


def test_callback_counts_network_evaluations():
    """A callback that counts calls next to a counting network: NFE per step as documented (Heun: 2 per step but
    the last; UniPC: 1)."""
    p = FlowMatching()
    net, evals = MIX.denoiser(p, "velocity"), []

    def counting(x, m, c):
        evals.append(1)
        return net(x, m, c)

    for name, nfe in [("heun_ode", 2 * STEPS - 1), ("edm_heun", 2 * STEPS - 2), ("unipc", STEPS), ("euler_ode", STEPS)]:
        evals.clear()
        steps_seen = []
        sample(Predictor(counting, p, "velocity"), (8, 2), sampler=name, steps=STEPS,
               callback=lambda i, t, x, x0: steps_seen.append(i))
        assert len(evals) == nfe and steps_seen == list(range(STEPS)), (name, len(evals))
