"""Every registered sampler fed the exact denoiser of a Gaussian mixture reproduces the mixture.

The statistic (``mixture.SlicedW1``) is the sliced Wasserstein-1 distance of N = 10,000 samples to a fixed exact
reference draw along 64 fixed directions. Its noise floor is the same statistic for independent exact N-draws
(16 of them); a sampler passes when its distance is <= 3x the floor's mean. ``test_statistic_calibration`` makes
the bound explicit: exact draws stay far below it (their max is ~1.6x the mean), and modest errors in the data
(component stds x1.2, mixture weights tilted by 0.1) exceed it, so the test is neither a coin flip nor vacuous.
Processes: the DDPM chain, a zero-terminal-SNR chain, VP, sub-VP, VE and the rectified flow; every sampler
runs on every process except where ``UNSUPPORTED`` says why not.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from ldm.diffusion import VESDE, VPSDE, DiscreteVP, FlowMatching, Predictor, SubVPSDE, make_betas
from ldm.sampling import SAMPLERS, sample
from tests.sampling.mixture import Mixture, SlicedW1, make_mixture

N = 10_000
FLOOR_FACTOR = 3.0
SEED = 3


def _mix8() -> Mixture:
    means = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return make_mixture([0.4, 0.3, 0.2, 0.1], 3 * means / means.norm(dim=1, keepdim=True), [0.5, 0.8, 1.0, 0.6])


MIXTURES = {
    "2d": make_mixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [0.5, 0.3, 0.7]),
    "8d": _mix8(),
}
PROCESSES = {
    "discrete": lambda: DiscreteVP(make_betas("linear", 1000)),  # the DDPM chain
    "zsnr": lambda: DiscreteVP(make_betas("scaled_linear", 1000, zero_terminal_snr=True)),  # alpha(1) = 0
    "vp": VPSDE,
    "subvp": SubVPSDE,
    "ve": VESDE,
    "flow": FlowMatching,  # x_t = (1 - t) x0 + t eps
}
# variant -> (registered sampler, options, steps); steps pass with margin on every case below
VARIANTS = {
    "ddpm": ("ddpm", {}, 200),
    "ddpm-large": ("ddpm", {"variance": "large"}, 200),
    "ddim": ("ddim", {}, 100),
    "euler_maruyama": ("euler_maruyama", {}, 100),
    "pc": ("pc", {}, 150),
    "pc-euler": ("pc", {"predictor": "euler"}, 150),
    "heun_ode": ("heun_ode", {}, 50),
    "dpmpp_2m": ("dpmpp_2m", {}, 50),
    "euler_ode": ("euler_ode", {}, 100),
    "flow_sde": ("flow_sde", {}, 100),
    "edm_heun": ("edm_heun", {}, 50),
    "edm_heun-churn": ("edm_heun", {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0}, 50),
    "euler_ancestral": ("euler_ancestral", {}, 200),
    "dpmpp_3m": ("dpmpp_3m", {}, 50),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, 100),
    "unipc": ("unipc", {}, 50),
}
# (variant, process) pairs that are not run, and why
UNSUPPORTED = {
    # the flow's VP-type forward SDE has g^2 = 2t / (1 - t): infinite at t = 1 (the samplers refuse it)
    ("euler_maruyama", "flow"): "singular SDE", ("pc-euler", "flow"): "singular SDE",
    # Euler in t takes (s - t) sigma'(t) for sigma_s - sigma_t, far off on VE's exponential sigma(t): 6-11x the floor
    # at 100 steps on the uniform grid, 4-5x on the Karras grid (it converges: test_ode_solvers_converge_at_their_order)
    ("euler_ode", "ve"): "uniform grid", ("flow_sde", "ve"): "uniform grid",
}
# (mixture, process, prediction): VP (DDPM chain, zero-SNR chain, VPSDE, sub-VP) and VE; eps, v and x0; 2-D and 8-D.
# Every parameterisation gives the same samples to 1e-9 (test_parameterisations_give_the_same_samples), so the
# distribution checks spread them over the cases instead of repeating each one.
CASES = [
    ("2d", "discrete", "eps"), ("2d", "zsnr", "v"), ("2d", "vp", "eps"), ("2d", "subvp", "x0"), ("2d", "ve", "v"),
    ("8d", "discrete", "v"), ("8d", "vp", "eps"), ("8d", "ve", "eps"), ("2d", "flow", "velocity"),
    ("8d", "flow", "velocity"),
]


def supported(variant: str, process: str) -> bool:
    return (variant, process) not in UNSUPPORTED


@functools.lru_cache(maxsize=None)
def statistic(mix: str) -> SlicedW1:
    return SlicedW1(MIXTURES[mix], N)


@functools.lru_cache(maxsize=None)
def floor(mix: str) -> torch.Tensor:
    return statistic(mix).floor(16)


def bound(mix: str) -> float:
    return FLOOR_FACTOR * float(floor(mix).mean())


@functools.lru_cache(maxsize=None)
def run(mix: str, process: str, prediction: str, variant: str, steps: int | None = None,
        spacing: str | None = None, time_shift: float = 1.0) -> float:
    """Distance to the mixture of N samples from a sampler variant over the exact denoiser (float64)."""
    name, options, default_steps = VARIANTS[variant]
    p, data = PROCESSES[process](), MIXTURES[mix]
    model = Predictor(data.denoiser(p, prediction), p, prediction)
    gen = torch.Generator().manual_seed(SEED)
    # start from the exact marginal at t = 1 so only the sampler's error is measured (VE's N(0, sigma_max^2) prior
    # alone shifts the mixture weights by a few percent: |mu| / sigma_max = 3 / 50)
    x_T = data.sample_noisy(N, float(p.alpha(1.0)), float(p.sigma(1.0)), gen)
    x = sample(model, x_T.shape, sampler=name, steps=steps or default_steps, generator=gen, x_T=x_T, spacing=spacing,
               time_shift=time_shift, **options)
    return statistic(mix)(x)


def test_every_registered_sampler_is_covered():
    own_file = {"annealed_langevin"}  # needs hundreds of levels: same statistic in test_annealed_langevin.py
    assert {name for name, _, _ in VARIANTS.values()} | own_file == set(SAMPLERS)


@pytest.mark.parametrize("mix", MIXTURES)
def test_statistic_calibration(mix):
    f = floor(mix)
    assert float(f.max()) < 0.7 * bound(mix), f"exact draws come near the bound: {f.tolist()}"
    perturbed = {"stds x1.2": dict(stds=MIXTURES[mix].stds * 1.2)}
    w = MIXTURES[mix].weights + torch.linspace(-0.1, 0.1, len(MIXTURES[mix].weights), dtype=torch.float64)
    perturbed["weights tilted"] = dict(weights=w)
    for what, change in perturbed.items():
        wrong = dataclasses.replace(MIXTURES[mix], **change)
        d = statistic(mix)(wrong.sample(N, torch.Generator().manual_seed(77))[0])
        assert d > bound(mix), f"{what}: {d:.4g} <= bound {bound(mix):.4g}: the statistic cannot see this error"


@pytest.mark.parametrize("case,variant", [(c, v) for c in CASES for v in VARIANTS if supported(v, c[1])],
                         ids=lambda c: "-".join(c) if isinstance(c, tuple) else c)
def test_sampler_reproduces_mixture(case, variant):
    d = run(*case, variant)
    floor_mean = bound(case[0]) / FLOOR_FACTOR
    assert d <= bound(case[0]), f"{variant} on {case}: distance {d:.4g} = {d / floor_mean:.2f} x the floor's mean"


@pytest.mark.parametrize("case,variant", [
    *[(c, v) for c in [("2d", "discrete", "eps"), ("2d", "ve", "v"), ("8d", "vp", "eps")]
      for v in ["ddpm", "ddpm-large", "euler_maruyama", "pc", "pc-euler", "edm_heun-churn", "dpmpp_2m_sde"]],
    *[(c, v) for c in [("2d", "flow", "velocity"), ("8d", "vp", "eps")] for v in ["flow_sde", "euler_ancestral"]]],
    ids=lambda c: "-".join(c) if isinstance(c, tuple) else c)
def test_stochastic_sampler_error_shrinks_with_steps(case, variant):
    coarse = [run(*case, variant, n) for n in (10, 25)]
    errors = coarse + [run(*case, variant)]
    assert errors[0] > errors[1] > errors[2], errors


# deterministic solver -> order its error must show over 16 -> 64 steps (mean observed order > order - 0.3)
ORDERS = {"ddim": 1, "euler_ode": 1, "heun_ode": 2, "edm_heun": 2, "dpmpp_2m": 2,
          # DPM-Solver++(3M) starts with a first-order step (a local error O(h^2)), which bounds its global order
          # by 2: measured 2.4-2.9 over 16 -> 64 steps, 1.9-2.0 from 64 to 128; UniPC's corrector lifts that step
          "dpmpp_3m": 2, "unipc": 3}


@functools.lru_cache(maxsize=None)
def _ode_solutions(process: str) -> dict:
    """Probability-flow ODE solutions from one x_T (1000 samples, 2-D): a fine reference and step ladders.

    The reference is UniPC with 512 steps (log-SNR grid; it agrees with DPM-Solver++(3M) at 2048 steps to ~1e-6,
    below every error measured here)."""
    p = PROCESSES[process]()
    prediction = "velocity" if process == "flow" else "eps"
    model = Predictor(MIXTURES["2d"].denoiser(p, prediction), p, prediction)
    x_T = p.prior_sample((1000, 2), torch.Generator().manual_seed(5), dtype=torch.float64)
    out = {"ref": sample(model, x_T.shape, sampler="unipc", steps=512, x_T=x_T, spacing="logsnr")}
    for name in ORDERS:
        for n in (16, 32, 64):
            out[name, n] = sample(model, x_T.shape, sampler=name, steps=n, x_T=x_T)
    return out


@pytest.mark.parametrize("sampler,order", ORDERS.items())
@pytest.mark.parametrize("process", ["vp", "ve", "flow"])
def test_ode_solvers_converge_at_their_order(process, sampler, order):
    """Deterministic solvers approach one probability-flow solution at their order: error ~ h^order.

    The per-sample error's median is used: a few samples on a boundary between modes, where the flow map is
    steep, dominate an RMS but not the median.
    """
    sol = _ode_solutions(process)
    errors = [float((sol[sampler, n] - sol["ref"]).norm(dim=1).median()) for n in (16, 32, 64)]
    assert errors[0] > errors[1] > errors[2], errors
    observed = math.log2(errors[0] / errors[2]) / 2  # mean order over 16 -> 64 steps
    assert observed > order - 0.3, (observed, errors)


@pytest.mark.parametrize("process,variant", [(p, v) for p in ["discrete", "vp", "subvp", "ve", "flow"] for v in VARIANTS
                                             if supported(v, p) or v in ("euler_ode", "flow_sde")])
def test_parameterisations_give_the_same_samples(variant, process):
    """eps, x0, v, score and velocity networks of the same exact denoiser drive a sampler to the same samples
    (on the flow, where alpha(1) = 0, the kinds that define x0 there: x0, v, velocity)."""
    name, options, _ = VARIANTS[variant]
    p = PROCESSES[process]()
    kinds = ("x0", "v", "velocity") if process == "flow" else ("eps", "x0", "v", "score", "velocity")
    outs = {pred: sample(Predictor(MIXTURES["2d"].denoiser(p, pred), p, pred), (256, 2), sampler=name, steps=12,
                         generator=torch.Generator().manual_seed(1), dtype=torch.float64, **options)
            for pred in kinds}
    for pred in kinds[1:]:
        torch.testing.assert_close(outs[pred], outs[kinds[0]], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("process", ["discrete", "vp", "ve", "zsnr", "flow"])
def test_sampler_identities(process):
    """DDIM with eta = 1 is DDPM with beta_tilde; PC's ancestral predictor without corrector is DDPM with beta;
    Euler-ancestral is DDIM with the same eta; UniP-1 is DDIM; flow_sde without noise is euler_ode; churn outside
    [s_tmin, s_tmax] is no churn; on the rectified flow euler_ode is DDIM."""
    p = PROCESSES[process]()
    model = Predictor(MIXTURES["2d"].denoiser(p, "v"), p, "v")
    spacing = "trailing" if process in ("discrete", "zsnr") else "uniform"  # one grid for every sampler compared

    def run_(name, **options):
        return sample(model, (512, 2), sampler=name, steps=20, generator=torch.Generator().manual_seed(2),
                      dtype=torch.float64, spacing=spacing, **options)

    same = functools.partial(torch.testing.assert_close, rtol=1e-9, atol=1e-9)
    same(run_("ddim", eta=1.0), run_("ddpm"))
    same(run_("pc", corrector_steps=0), run_("ddpm", variance="large"))
    for eta in (0.0, 0.5, 1.0):
        same(run_("euler_ancestral", eta=eta), run_("ddim", eta=eta))
    same(run_("unipc", order=1, corrector=False), run_("ddim"))
    same(run_("flow_sde", noise=0.0), run_("euler_ode"))
    same(run_("edm_heun", s_churn=30.0, s_tmin=1e9), run_("edm_heun"))
    if process == "flow":
        same(run_("euler_ode"), run_("ddim"))


def test_singular_sdes_are_refused():
    """The flow's VP-type reverse SDE has g(1)^2 = inf: Euler-Maruyama would return NaN, so it refuses."""
    p = FlowMatching()
    model = Predictor(MIXTURES["2d"].denoiser(p, "velocity"), p, "velocity")
    for name, options in [("euler_maruyama", {}), ("pc", {"predictor": "euler"})]:
        with pytest.raises(ValueError, match="singular"):
            sample(model, (4, 2), sampler=name, steps=5, **options)


@pytest.mark.parametrize("case,variant", [(c, v) for c in [("2d", "discrete", "eps"), ("2d", "ve", "v")]
                                          for v in VARIANTS if VARIANTS[v][0] != "pc" and supported(v, c[1])],
                         ids=lambda c: "-".join(c) if isinstance(c, tuple) else c)
def test_karras_grid_serves_every_sampler(case, variant):
    """The Karras rho-grid (spacing "karras") is a grid for every sampler: the same band, the same steps."""
    d = run(*case, variant, spacing="karras")
    assert d <= bound(case[0]), f"{variant} on {case} (karras): {d:.4g} = {d / (bound(case[0]) / FLOOR_FACTOR):.2f}x"


@pytest.mark.parametrize("variant", ["euler_ode", "heun_ode", "flow_sde", "unipc"])
def test_sd3_shifted_grids_reproduce_the_mixture(variant):
    """SD3's shift (s = 3) moves the flow's grid towards noise; the samplers still reproduce the mixture."""
    d = run("2d", "flow", "velocity", variant, time_shift=3.0)
    assert d <= bound("2d"), f"{variant} with time_shift 3: {d:.4g} = {d / (bound('2d') / FLOOR_FACTOR):.2f}x"
