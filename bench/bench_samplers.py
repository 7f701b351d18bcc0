"""Samplers: accuracy against a closed form vs the number of network evaluations, and overhead per evaluation.

* ``--what mixture``: distance to a 2-D Gaussian mixture of N = 10,000 samples from its exact denoiser (the sliced
  Wasserstein-1 statistic of tests/sampling/mixture.py, as a multiple of the statistic's noise floor, i.e. of what
  exact draws score: ~1.0 is perfect, the tests' bound is 3.0) for every registered sampler at 5, 10, 20 and 50
  network evaluations (NFE: steps chosen as the most that fit the budget; Heun-type samplers spend 2 per step,
  predictor-corrector 2), on the DDPM chain (eps), the VP SDE (eps), VE (eps) and the rectified flow (velocity),
  each on its default grid, starting from the exact marginal at t = 1.
* ``--what overhead``: the time a sampler spends per network evaluation outside the network. A no-op network
  (zeros) isolates the sampler's own work (schedule coefficients, parameterisation conversion, update, noise). It is
  compared with one forward of the default UNet (preset "emoji-cpu": batch 32, 8x8x4 latents, a (32, 16, 384) text
  context) and with diffusers' scheduler loop for the same algorithm and number of steps, driven by the same no-op
  network on the same discrete linear schedule (T = 1000).

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_samplers [--what all] [--steps 50] [--repeats 7]
    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_samplers --what mixture \
        --out bench/results/samplers_mixture.txt      # the table the README cites, with its provenance line
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch

from ldm.diffusion import VESDE, VPSDE, DiscreteVP, FlowMatching, Predictor, make_betas
from ldm.sampling import SAMPLERS, sample

SHAPE = (32, 4, 8, 8)  # (B, C, H, W) latents of the emoji default
CONTEXT = (32, 16, 384)  # (B, tokens, dim) MiniLM token embeddings
# our sampler -> (diffusers scheduler class, constructor options) for the comparable algorithm
DIFFUSERS = {
    "ddpm": ("DDPMScheduler", {"variance_type": "fixed_small", "timestep_spacing": "trailing"}),
    "ddim": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "timestep_spacing": "trailing"}),
    "euler_maruyama": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),  # 1st-order stochastic
    "heun_ode": ("HeunDiscreteScheduler", {"timestep_spacing": "trailing"}),  # 2nd-order ODE, 2 evaluations a step
    "pc": (None, {}),  # no predictor-corrector scheduler in diffusers
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "edm_heun": ("HeunDiscreteScheduler", {"timestep_spacing": "trailing"}),  # Karras et al. Alg. 1 in sigma
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3,
                                                 "timestep_spacing": "trailing"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                     "timestep_spacing": "trailing"}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 3, "timestep_spacing": "trailing"}),
}
NFE_BUDGETS = (5, 10, 15, 20, 50)
# what the mixture table measures (bench/provenance.py: a change to these after its commit makes it stale)
MIXTURE_MEASURES = ["bench/bench_samplers.py", "ldm/sampling", "ldm/diffusion/schedules.py", "ldm/diffusion/sde.py",
                    "ldm/diffusion/flow.py", "ldm/diffusion/parameterization.py", "ldm/diffusion/grids.py",
                    "ldm/diffusion/edm.py", "tests/sampling/mixture.py"]
MIXTURE_PROCESSES = {  # name -> (process, prediction)
    "ddpm chain": (lambda: DiscreteVP(make_betas("linear", 1000)), "eps"),
    "vp": (VPSDE, "eps"),
    "ve": (VESDE, "eps"),
    "flow": (FlowMatching, "velocity"),
}
MIXTURE_VARIANTS = {  # row -> (sampler, options); annealed_langevin needs hundreds of evaluations (NCSN levels)
    **{name: (name, {}) for name in SAMPLERS if name != "annealed_langevin"},
    "ddpm-large": ("ddpm", {"variance": "large"}),
    "edm_heun-churn": ("edm_heun", {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0}),
}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def unet_forward_seconds(repeats: int) -> float:
    from ldm.models import UNet, unet_preset

    unet = UNet(**unet_preset("emoji-cpu", in_channels=4, out_channels=4)).eval()
    x, t = torch.randn(SHAPE), torch.full((SHAPE[0],), 500.0)
    context = torch.randn(CONTEXT)
    return median_time(lambda: unet(x, t, context), repeats)


def ours_seconds_per_eval(name: str, steps: int, repeats: int) -> float:
    calls = [0]

    def noop(x, m, cond):
        calls[0] += 1
        return torch.zeros_like(x)

    model = Predictor(noop, DiscreteVP(make_betas("linear", 1000)), "eps")
    x_T = torch.randn(SHAPE)
    run = lambda: sample(model, SHAPE, sampler=name, steps=steps, x_T=x_T,  # noqa: E731
                         generator=torch.Generator().manual_seed(0))
    calls[0] = 0
    run()
    evals = calls[0]
    return median_time(run, repeats) / evals


def diffusers_seconds_per_eval(name: str, steps: int, repeats: int) -> float | None:
    cls_name, options = DIFFUSERS[name]
    if cls_name is None:
        return None
    import diffusers

    scheduler = getattr(diffusers, cls_name)(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                             beta_end=2e-2, **options)
    x_T = torch.randn(SHAPE)
    calls = [0]
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters  # Heun's step has none

    def run():
        scheduler.set_timesteps(steps)
        x = x_T * scheduler.init_noise_sigma
        options = {"generator": torch.Generator().manual_seed(0)} if takes_generator else {}
        for t in scheduler.timesteps:
            calls[0] += 1
            out = torch.zeros_like(scheduler.scale_model_input(x, t))
            x = scheduler.step(out, t, x, **options).prev_sample
        return x

    calls[0] = 0
    run()
    evals = calls[0]
    return median_time(run, repeats) / evals


def count_nfe(name: str, steps: int, process, options: dict) -> int:
    calls = [0]

    def count(x, m, cond):
        calls[0] += 1
        return torch.zeros_like(x)

    sample(Predictor(count, process, "x0"), (1, 1), sampler=name, steps=steps,
           generator=torch.Generator().manual_seed(0), **options)
    return calls[0]


def steps_for(name: str, budget: int, process, options: dict) -> tuple[int, int]:
    """The most steps whose evaluation count fits the budget, and that count."""
    best = (1, count_nfe(name, 1, process, options))
    for steps in range(2, budget + 1):
        nfe = count_nfe(name, steps, process, options)
        if nfe > budget:
            break
        best = (steps, nfe)
    return best


def mixture_table(n: int = 10_000, budgets: tuple[int, ...] = NFE_BUDGETS) -> list[str]:
    """The table's lines (each printed as it is done): every sampler's distance to the mixture per process and NFE."""
    from tests.sampling.mixture import SlicedW1, make_mixture

    lines = []

    def emit(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    mix = make_mixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [0.5, 0.3, 0.7])
    statistic = SlicedW1(mix, n)
    floors = statistic.floor(16)
    floor = float(floors.mean())
    width = 7 * len(budgets) + 2
    emit(f"distance to the 2-D mixture / noise floor of exact draws ({n} samples, floor {floor:.4f}: the mean over 16 "
         f"independent exact draws, which score {float(floors.min()) / floor:.2f}-{float(floors.max()) / floor:.2f}); "
         f"columns: NFE {', '.join(map(str, budgets))}; '*' = fewer evaluations than the budget")
    emit("")
    header = f"{'sampler':<16}" + "".join(f"{name:>{width}}" for name in MIXTURE_PROCESSES)
    emit(header)
    emit("-" * len(header))
    for row, (name, options) in MIXTURE_VARIANTS.items():
        cells = []
        for make, prediction in MIXTURE_PROCESSES.values():
            p = make()
            model = Predictor(mix.denoiser(p, prediction), p, prediction)
            values = []
            for budget in budgets:
                try:
                    steps, nfe = steps_for(name, budget, p, options)
                    gen = torch.Generator().manual_seed(3)
                    x_T = mix.sample_noisy(n, float(p.alpha(1.0)), float(p.sigma(1.0)), gen)
                    x = sample(model, x_T.shape, sampler=name, steps=steps, generator=gen, x_T=x_T, **options)
                    values.append(f"{statistic(x) / floor:6.1f}{'*' if nfe < budget else ' '}")
                except ValueError:  # e.g. Euler-Maruyama on the flow's singular SDE
                    values.append(f"{'-':>6} ")
            cells.append("".join(values).rjust(width))
        emit(f"{row:<16}" + "".join(cells))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("all", "mixture", "overhead"), default="all")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--nfe", default=",".join(map(str, NFE_BUDGETS)), help="NFE budgets of the mixture table")
    parser.add_argument("--out", default=None, help="also write the mixture table, with its provenance, to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.what in ("all", "mixture"):
        from bench.provenance import line, record

        prov = record(MIXTURE_MEASURES)
        lines = mixture_table(budgets=tuple(int(b) for b in args.nfe.split(",")))
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write("\n".join([line(prov), *lines]) + "\n")
        print()
    if args.what == "mixture":
        return
    unet = unet_forward_seconds(args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); batch {SHAPE}, context {CONTEXT}, "
          f"{args.steps} steps")
    print(f"UNet forward (emoji-cpu): {unet * 1e3:.2f} ms\n")
    header = (f"{'sampler':<16}{'ours us/eval':>13}{'/ UNet':>9}{'diffusers scheduler':>33}{'us/eval':>9}"
              f"{'ours/diff':>11}")
    print(header)
    print("-" * len(header))
    for name in DIFFUSERS:
        ours = ours_seconds_per_eval(name, args.steps, args.repeats)
        theirs = diffusers_seconds_per_eval(name, args.steps, args.repeats)
        cls_name = DIFFUSERS[name][0] or "-"
        theirs_cols = (f"{theirs * 1e6:>9.0f}{ours / theirs:>11.2f}" if theirs is not None else f"{'-':>9}{'-':>11}")
        print(f"{name:<16}{ours * 1e6:>13.0f}{ours / unet:>9.2%}{cls_name:>33}{theirs_cols}")


if __name__ == "__main__":
    main()
