"""Sampler overhead: the time a sampler spends per network evaluation outside the network.

A no-op network (zeros) isolates the sampler's own work (schedule coefficients, parameterisation conversion, update,
noise). It is compared with one forward of the default UNet (preset "emoji-cpu": batch 32, 8x8x4 latents, a
(32, 16, 384) text context) and with diffusers' scheduler loop for the same algorithm and number of steps, driven by
the same no-op network on the same discrete linear schedule (T = 1000).

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python bench/bench_samplers.py [--steps 50] [--repeats 7]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch

from ldm.diffusion import DiscreteVP, Predictor, make_betas
from ldm.sampling import sample

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
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
