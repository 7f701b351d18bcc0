"""Reference: our DDPM / DDIM chains against diffusers' DDPMScheduler / DDIMScheduler (the test extra).

Both are driven by one fixed fake network and by generators with the same seed; our samplers and diffusers' step
draw their noise in the same order with the same shape and dtype, so whole trajectories line up draw for draw. Every
network input along the way (the trajectory) and the final clean estimate are compared, in two settings:

* "shared": diffusers' scheduler given our float64 alpha_bar (the same numbers for the same beta schedule), run in
  float64: the step algebra must agree to 1e-10 (it agrees to ~1e-13; in float32 bit for bit);
* "diffusers": its own float32 schedule, run in float32: agreement to 1e-5 relative to the trajectory's scale (the
  whole difference is diffusers' float32 cumprod of alpha_bar, ~5e-5 absolute on |x| <= 13 after 50 steps).
"""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import DiscreteVP, Predictor, make_betas
from ldm.sampling.samplers import ddim, ddpm

diffusers = pytest.importorskip("diffusers")

T, STEPS = 1000, 50
TOL = {"shared": 1e-9, "diffusers": 1e-5}  # absolute in float64; relative to max |x| in float32
PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
BETA_RANGE = {"linear": (1e-4, 2e-2), "scaled_linear": (0.00085, 0.012), "cosine": (1e-4, 2e-2)}  # our defaults


def fake_net(x: torch.Tensor, n: float) -> torch.Tensor:
    """A fixed smooth stand-in for a trained network at timestep n (keeps the chain in a sane range)."""
    c = n / T
    return 0.8 * c * x + 0.3 * torch.sin(2 * x + c)


def run_ours(sampler, process, prediction, spacing, seed, x_T, **options):
    inputs = []

    def denoiser(x, m, cond):
        inputs.append(x.clone())
        return fake_net(x, float(m[0]))

    model = Predictor(denoiser, process, prediction)
    out = sampler(model, x_T.clone(), process.timesteps(STEPS, spacing), generator=torch.Generator().manual_seed(seed),
                  **options)
    return inputs, out


def run_diffusers(scheduler, seed, x_T, **step_options):
    scheduler.set_timesteps(STEPS)
    gen, x, inputs = torch.Generator().manual_seed(seed), x_T.clone(), []
    for t in scheduler.timesteps:
        inputs.append(x.clone())
        result = scheduler.step(fake_net(x, float(t)), t, x, generator=gen, **step_options)
        x, x0 = result.prev_sample, result.pred_original_sample
    return inputs, x0, x


def setup(source: str, scheduler, process):
    """The scheduler and start point of a setting: shared float64 schedule, or diffusers' own float32 one."""
    if source == "shared":
        scheduler.alphas_cumprod = process.alphas_cumprod.clone()
        return torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))


def diff(source: str, ours, theirs) -> float:
    """Max abs difference over a trajectory (list) or a tensor; relative to max |theirs| for diffusers' schedule."""
    ours, theirs = (ours, theirs) if isinstance(ours, list) else ([ours], [theirs])
    assert len(ours) == len(theirs)
    d = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    return d if source == "shared" else d / max(float(b.abs().max()) for b in theirs)


CHAINS = [("linear", False, p, s) for p in PREDICTION for s in ("leading", "trailing")] + \
         [("scaled_linear", False, "eps", "trailing"), ("cosine", False, "v", "leading"),
          ("scaled_linear", True, "v", "trailing"), ("linear", True, "v", "leading")]  # zero terminal SNR + v


def _id(chain):
    schedule, zsnr, prediction, spacing = chain
    return f"{schedule}{'-zsnr' if zsnr else ''}-{prediction}-{spacing}"


def _settings(chain) -> list[str]:
    # x0 prediction divides by sqrt(1 - alpha_bar) ~ 0.01 at t = 0, which amplifies diffusers' float32 schedule error
    # past 1e-5: it is compared on the shared schedule only
    return ["shared"] if chain[2] == "x0" else ["shared", "diffusers"]


@pytest.mark.parametrize("chain,variance,source", [(c, v, s) for c in CHAINS for v in ("small", "large")
                                                   for s in _settings(c)],
                         ids=lambda v: _id(v) if isinstance(v, tuple) else str(v))
def test_ddpm_matches_diffusers(chain, variance, source):
    schedule, zsnr, prediction, spacing = chain
    process = DiscreteVP(make_betas(schedule, T, zero_terminal_snr=zsnr))
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=SCHEDULE[schedule], clip_sample=False,
                                    beta_start=BETA_RANGE[schedule][0], beta_end=BETA_RANGE[schedule][1],
                                    thresholding=False, prediction_type=PREDICTION[prediction],
                                    variance_type=f"fixed_{variance}", timestep_spacing=spacing,
                                    rescale_betas_zero_snr=zsnr)
    x_T = setup(source, sched, process)
    ours_in, ours = run_ours(ddpm, process, prediction, spacing, 7, x_T, variance=variance)
    theirs_in, theirs_x0, theirs_last = run_diffusers(sched, 7, x_T)
    assert diff(source, ours_in, theirs_in) < TOL[source]
    assert diff(source, ours, theirs_x0) < TOL[source]
    if spacing == "leading" or variance == "small":
        # at the last step diffusers adds noise of variance beta_tilde (floored at 1e-20), or, with trailing spacing
        # and "large", beta_t: we return the clean estimate there (Ho et al. Alg. 2 sets z = 0 at t = 1)
        assert diff(source, ours, theirs_last) < TOL[source]


@pytest.mark.parametrize("chain,eta,source", [(c, e, s) for c in CHAINS for e in (0.0, 1.0) for s in _settings(c)
                                              # in float32 diffusers' sqrt(1 - alpha_bar_prev - std^2) is NaN at
                                              # zero SNR with eta = 1 (a tiny negative difference)
                                              if not (c[1] and e == 1.0 and s == "diffusers")],
                         ids=lambda v: _id(v) if isinstance(v, tuple) else str(v))
def test_ddim_matches_diffusers(chain, eta, source):
    schedule, zsnr, prediction, spacing = chain
    process = DiscreteVP(make_betas(schedule, T, zero_terminal_snr=zsnr))
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule=SCHEDULE[schedule], clip_sample=False,
                                    beta_start=BETA_RANGE[schedule][0], beta_end=BETA_RANGE[schedule][1],
                                    thresholding=False, set_alpha_to_one=True, steps_offset=0,
                                    prediction_type=PREDICTION[prediction], timestep_spacing=spacing,
                                    rescale_betas_zero_snr=zsnr)
    x_T = setup(source, sched, process)
    ours_in, ours = run_ours(ddim, process, prediction, spacing, 11, x_T, eta=eta)
    theirs_in, theirs_x0, theirs_last = run_diffusers(sched, 11, x_T, eta=eta)
    assert diff(source, ours_in, theirs_in) < TOL[source]
    assert diff(source, ours, theirs_x0) < TOL[source]
    assert diff(source, ours, theirs_last) < TOL[source]  # final alpha_bar = 1: the last step returns x0


@pytest.mark.parametrize("zsnr", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULE)
def test_betas_match_diffusers(schedule, zsnr):
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=SCHEDULE[schedule],
                                    beta_start=BETA_RANGE[schedule][0], beta_end=BETA_RANGE[schedule][1],
                                    rescale_betas_zero_snr=zsnr)
    ours = make_betas(schedule, T, zero_terminal_snr=zsnr)
    ab = DiscreteVP(ours).alphas_cumprod
    if zsnr:  # the rescale is linear in sqrt(alpha_bar); diffusers' float32 betas carry ~1e-3 relative error there
        torch.testing.assert_close(ab.sqrt().float(), sched.alphas_cumprod.sqrt(), rtol=0, atol=2e-6)
        assert float(ab[-1]) == 0.0 == float(sched.alphas_cumprod[-1])
    else:
        torch.testing.assert_close(ours.float(), sched.betas, rtol=2e-6, atol=1e-8)
        torch.testing.assert_close(ab.float(), sched.alphas_cumprod, rtol=2e-5, atol=1e-8)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers(spacing):
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    process = DiscreteVP(make_betas("linear", T))
    compared = 0
    for steps in list(range(1, 60)) + [100, 121, 250, 333, 999, 1000]:
        ours = process.model_time(process.timesteps(steps, spacing)[:-1]).round().long()
        assert len(ours) == steps and bool((ours[:-1] > ours[1:]).all()) and 0 <= int(ours.min()) <= int(ours.max()) < T
        sched.set_timesteps(steps)
        if len(sched.timesteps) == steps:  # diffusers' float arange gives steps + 1 trailing points for some steps
            assert ours.tolist() == sched.timesteps.tolist(), steps
            compared += 1
    assert compared > 50
