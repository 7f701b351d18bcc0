"""Reference: the flow, EDM and multistep samplers against diffusers' schedulers for the same algorithm.

One fixed fake network drives both sides (as in test_reference_diffusers.py); every network input along the way
(the trajectory) and the final sample are compared. diffusers' DPM-Solver, UniPC and flow schedulers step in float32
(they upcast the sample and keep sigmas in float32), so both sides run in float32 and agree to 2e-5 relative to the
trajectory's scale; the discrete chains share our float64 alpha_bar (``scheduler.alphas_cumprod``).

* euler_ode / heun_ode on the rectified flow = FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler
  (with and without SD3's shift);
* euler_ancestral on the DDPM chain = EulerAncestralDiscreteScheduler (noise draw for draw; it steps x / alpha, up
  to ~160 |x| in float32: 1e-4);
* dpmpp_3m = DPMSolverMultistepScheduler(solver_order=3), dpmpp_2m_sde = its "sde-dpmsolver++" (draw for draw),
  unipc = UniPCMultistepScheduler (bh2, orders 2 and 3), all under 15 steps, where diffusers lowers the order of
  the last steps as we always do.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from ldm.diffusion import DiscreteVP, FlowMatching, Predictor, make_betas, shift_time
from ldm.sampling.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")

T = 1000
TOL = 2e-5  # relative to max |x| of diffusers' trajectory
TOL_EULER = 1e-4  # Euler-ancestral steps x / alpha, |x / alpha| ~ 160 |x| at the start, in float32
PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def fake_net(x: torch.Tensor, n: torch.Tensor | float) -> torch.Tensor:
    """A fixed smooth stand-in for a trained network at timestep n (keeps the chain in a sane range)."""
    c = float(n) / T
    return 0.8 * c * x + 0.3 * torch.sin(2 * x + c)


def run_ours(name, process, prediction, ts, x_T, seed=0, **options):
    inputs = []

    def denoiser(x, m, cond):
        inputs.append(x.clone())
        return fake_net(x, m[0])

    out = SAMPLERS[name](Predictor(denoiser, process, prediction), x_T.clone(), ts,
                         generator=torch.Generator().manual_seed(seed), **options)
    return inputs, out


def run_diffusers(scheduler, x_T, seed=0, scale_input=False):
    """scale_input: diffusers' Euler schedulers work on x / alpha (init_noise_sigma, scale_model_input)."""
    gen, inputs = torch.Generator().manual_seed(seed), []
    options = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = x_T.clone() * (scheduler.init_noise_sigma if scale_input else 1.0)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t) if scale_input else x
        inputs.append(model_in.clone())
        x = scheduler.step(fake_net(model_in, t), t, x, **options).prev_sample
    return inputs, x


def diff(ours, theirs) -> float:
    ours, theirs = (ours, theirs) if isinstance(ours, list) else ([ours], [theirs])
    assert len(ours) == len(theirs)
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs)) / max(float(b.abs().max()) for b in theirs)


def start():
    return torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("name,cls", [("euler_ode", "FlowMatchEulerDiscreteScheduler"),
                                      ("heun_ode", "FlowMatchHeunDiscreteScheduler")])
def test_flow_samplers_match_diffusers(name, cls, shift):
    steps, process = 12, FlowMatching(time_scale=T)
    scheduler = getattr(diffusers, cls)(num_train_timesteps=T, shift=shift)
    if cls == "FlowMatchEulerDiscreteScheduler":  # unshifted sigmas in; the scheduler shifts them
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / T, steps).tolist())
    else:  # its own grid (it shifts its sigma_min twice): run ours on exactly that grid
        scheduler.set_timesteps(steps)
    ts = scheduler.sigmas.double().unique_consecutive()  # (steps + 1,) ending at 0; Heun repeats inner sigmas
    assert len(ts) == steps + 1
    if cls == "FlowMatchEulerDiscreteScheduler":  # our uniform grid and SD3 shift are diffusers' grid
        torch.testing.assert_close(shift_time(process.timesteps(steps, "uniform"), shift), ts, rtol=0, atol=1e-6)
    x_T = start()
    ours_in, ours = run_ours(name, process, "velocity", ts, x_T)
    theirs_in, theirs = run_diffusers(scheduler, x_T)
    assert diff(ours_in, theirs_in) < TOL and diff(ours, theirs) < TOL


def _chain():
    return DiscreteVP(make_betas("linear", T))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_euler_ancestral_matches_diffusers(prediction):
    process, steps = _chain(), 20
    scheduler = diffusers.EulerAncestralDiscreteScheduler(num_train_timesteps=T, beta_schedule="linear",
                                                          prediction_type=PREDICTION[prediction],
                                                          timestep_spacing="trailing")
    scheduler.alphas_cumprod = process.alphas_cumprod.clone()
    scheduler.set_timesteps(steps)
    x_T = start()
    ours_in, ours = run_ours("euler_ancestral", process, prediction, process.timesteps(steps, "trailing"), x_T, seed=5)
    theirs_in, theirs = run_diffusers(scheduler, x_T, seed=5, scale_input=True)
    assert diff(ours_in, theirs_in) < TOL_EULER and diff(ours, theirs) < TOL_EULER


DPM = "DPMSolverMultistepScheduler"
SOLVERS = [("dpmpp_3m", DPM, {"algorithm_type": "dpmsolver++", "solver_order": 3}, {}),
           ("dpmpp_2m_sde", DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, {}),
           ("unipc", "UniPCMultistepScheduler", {"solver_order": 2}, {"order": 2}),
           ("unipc", "UniPCMultistepScheduler", {"solver_order": 3}, {"order": 3})]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name,cls,theirs_options,our_options", SOLVERS, ids=lambda v: str(v) if isinstance(v, str)
                         else None)
def test_multistep_solvers_match_diffusers(name, cls, theirs_options, our_options, prediction):
    process = _chain()
    for steps in (6, 12):
        scheduler = getattr(diffusers, cls)(num_train_timesteps=T, beta_schedule="linear", timestep_spacing="trailing",
                                            prediction_type=PREDICTION[prediction], **theirs_options)
        scheduler.alphas_cumprod = process.alphas_cumprod.clone()
        scheduler.set_timesteps(steps)
        x_T = start()
        ours_in, ours = run_ours(name, process, prediction, process.timesteps(steps, "trailing"), x_T, seed=9,
                                 **our_options)
        theirs_in, theirs = run_diffusers(scheduler, x_T, seed=9)
        assert diff(ours_in, theirs_in) < TOL and diff(ours, theirs) < TOL, (steps, diff(ours_in, theirs_in))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_edm_heun_without_churn_matches_diffusers_heun(prediction):
    """Karras et al. 2022, Alg. 1 in EDM's frame = HeunDiscreteScheduler (k-diffusion's sample_heun), on the chain."""
    process, steps = _chain(), 12
    scheduler = diffusers.HeunDiscreteScheduler(num_train_timesteps=T, beta_schedule="linear",
                                                prediction_type=PREDICTION[prediction], timestep_spacing="trailing")
    scheduler.alphas_cumprod = process.alphas_cumprod.clone()
    scheduler.set_timesteps(steps)
    x_T = start()
    ours_in, ours = run_ours("edm_heun", process, prediction, process.timesteps(steps, "trailing"), x_T)
    theirs_in, theirs = run_diffusers(scheduler, x_T, scale_input=True)
    assert diff(ours_in, theirs_in) < TOL_EULER and diff(ours, theirs) < TOL_EULER
