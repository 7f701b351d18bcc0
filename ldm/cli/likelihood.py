"""ldm-likelihood: bits/dim of held-out data under a trained latent diffusion model (probability-flow ODE and ELBO).

Examples:
  ldm-likelihood --model runs/emoji-ldm/export                         # 4 val batches of 16, captions as condition
  ldm-likelihood --model runs/emoji-ldm --data data/emoji --batches 8 --hutchinson-probes 4 --unconditional
  ldm-likelihood --model runs/emoji-ldm/export --ode-steps 32 --elbo-terms 100 --tracking-uri http://127.0.0.1:5000

The held-out images (--split val of --data, default the model's data.val) are encoded by the model's own frozen
autoencoder (posterior mode x scale factor), so every number is about the continuous latents the diffusion model
was trained on (D = C x h x w dimensions): no dequantisation or 8-bit offset enters, bits/dim may be negative and is
not comparable with pixel-space bits/dim. Per sample it computes
  * ODE: log p(z | caption) through the probability-flow ODE (instantaneous change of variables, Song et al. 2021),
    adaptive RK45 (--rtol/--atol) or fixed-step RK4 (--ode-steps), divergence by Hutchinson's estimator with
    --hutchinson-probes Rademacher probes or exactly (--exact-trace: D backward passes per step);
  * ELBO (DDPM chains only): the variational bound of Ho et al. 2020 (prior KL, per-step KLs, decoder), all T - 1
    step terms or an unbiased stratified estimate from --elbo-terms of them; -ELBO in bits/dim bounds the NLL
    from above.
--unconditional scores log p(z) under the stored null condition instead of the caption.
Writes <out>/likelihood.json (settings, summary, per-sample values) and <out>/likelihood.png (per-sample bits/dim),
prints a table and logs params, likelihood/* metrics and both files to MLflow (unless --no-tracking).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.cli._common import load_model, run_main, usage_error


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ldm-likelihood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="exported model folder, a training run folder (its latest checkpoint is exported first), "
                        "or an MLflow runs:/ or models:/ URI")
    p.add_argument("--data", default=None, help="held-out shards: folder with index.json or a URL pattern "
                                                "(default: the model's data.val)")
    p.add_argument("--split", default="val", help="split of --data (default: val)")
    p.add_argument("--batches", type=int, default=4, help="batches to evaluate (default: 4)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per batch (default: 16)")
    trace = p.add_mutually_exclusive_group()
    trace.add_argument("--hutchinson-probes", type=int, default=1,
                       help="Rademacher probes per sample for the divergence (default: 1)")
    trace.add_argument("--exact-trace", action="store_true", help="exact divergence (D backward passes per step)")
    solver = p.add_mutually_exclusive_group()
    solver.add_argument("--ode-steps", type=int, default=None, help="fixed RK4 steps instead of adaptive RK45")
    solver.add_argument("--rtol", type=float, default=1e-4, help="RK45 relative tolerance (default: 1e-4)")
    p.add_argument("--atol", type=float, default=1e-4, help="RK45 absolute tolerance (default: 1e-4)")
    p.add_argument("--elbo-terms", type=int, default=None,
                   help="KL terms of the DDPM bound to evaluate, one drawn from each of as many blocks of steps "
                        "(unbiased, stratified; default: all T - 1)")
    p.add_argument("--elbo-variance", choices=("small", "large"), default="small",
                   help="reverse-step variance of the bound: beta_tilde (small, default) or beta (large)")
    p.add_argument("--no-elbo", dest="elbo", action="store_false", help="skip the DDPM bound")
    p.add_argument("--unconditional", action="store_true", help="condition on the stored null condition")
    p.add_argument("--seed", type=int, default=0, help="seed of the probes and the bound's noise (default: 0)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:N")
    p.add_argument("--out", default="likelihood", help="output folder (default: likelihood/)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the model's tracking.uri or "
                        "runs/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the model's tracking.experiment)")
    p.add_argument("--no-tracking", dest="tracking", action="store_false", help="log nothing to MLflow")
    args = p.parse_args(argv)
    for name in ("batches", "batch_size", "hutchinson_probes", "ode_steps", "elbo_terms"):
        value = getattr(args, name)
        if value is not None and value < 1:
            usage_error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.rtol <= 0 or args.atol <= 0:
        usage_error(f"--rtol and --atol must be positive, got {args.rtol} and {args.atol}")
    if not args.model.startswith(("runs:/", "models:/")) and not Path(args.model).is_dir():
        usage_error(f"--model: no such folder {args.model}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_main(likelihood, parse(argv))


def likelihood(args: argparse.Namespace) -> None:
    """Load the model and its held-out data (usage errors name the flag), compute, record and print the likelihoods."""
    from ldm.data import resolve_shards
    from ldm.eval.likelihood import held_out_likelihood, record_likelihood
    from ldm.tracking import Tracker, tracking_uri

    pipe, cfg = load_model(args.model, args.device, args.tracking_uri, args.raw_weights)
    spec = args.data or cfg.data.val
    if not spec:
        usage_error("the model's config has no data.val: pass --data with held-out shards")
    try:
        resolve_shards(spec, args.split)
    except ValueError as e:
        usage_error(f"--data: {e}")
    try:
        result = held_out_likelihood(
            pipe, spec, args.split, image_size=cfg.data.image_size, caption=cfg.data.caption,
            batches=args.batches, batch_size=args.batch_size, exact_trace=args.exact_trace,
            probes=args.hutchinson_probes, ode_steps=args.ode_steps, rtol=args.rtol, atol=args.atol,
            elbo=args.elbo, elbo_terms=args.elbo_terms, elbo_variance=args.elbo_variance,
            unconditional=args.unconditional, seed=args.seed)
    except ValueError as e:
        usage_error(f"--elbo-terms: {e}" if "elbo_terms" in str(e) else f"--data: {e}")
    settings = {"model": str(Path(args.model).resolve()), **result.settings,
                "weights": "raw" if args.raw_weights else "ema"}
    tracker = Tracker(tracking_uri(args.tracking_uri, cfg.tracking.uri), args.experiment or cfg.tracking.experiment,
                      f"likelihood-{cfg.run.name}", enabled=args.tracking)
    written = record_likelihood(result, settings, args.out, tracker, cfg.diffusion)
    _print_table(settings, result.summary, result.elbo, args.elbo and not result.elbo, type(pipe.process).__name__)
    print(f"wrote {written[0]} and {written[1]}" + (f"; logged run {tracker.run_id} to {tracker.uri}"
                                                    if tracker.run_id else ""))


def _print_table(settings: dict, summary: dict, elbo_on: bool, elbo_skipped: bool, process: str) -> None:
    print(f"\n{settings['samples']} held-out latents ({settings['split']} of {settings['data']}), "
          f"D = {settings['dim']} ({'x'.join(map(str, settings['latent_shape']))}), "
          f"condition: {settings['condition']}, {settings['weights']} weights")
    print(f"{'':34}{'mean':>12}{'std. err':>12}")
    lines = [("ODE   bits/dim", "ode_bpd"), ("ODE   log p (nats)", "ode_logp_nats")]
    if elbo_on:
        lines += [("ELBO  bits/dim (>= NLL bits/dim)", "elbo_bpd"), ("ELBO  (nats)", "elbo_nats"),
                  ("      prior KL (nats)", "elbo_prior_kl_nats"), ("      sum of step KLs (nats)",
                                                                   "elbo_diffusion_kl_nats"),
                  ("      decoder NLL (nats)", "elbo_decoder_nll_nats")]
    for label, key in lines:
        err = summary.get(f"{key}_stderr")
        print(f"{label:34}{summary[key]:12.4f}{'' if err is None else f'{err:12.4f}'}")
    print(f"ODE: {settings['ode_solver']} in {settings['ode_time']} time, {settings['trace']} trace, "
          f"{summary['ode_nfe']:.0f} evaluations per batch; ELBO: {settings['elbo']}")
    if elbo_skipped:
        print(f"ELBO: not defined for this model's {process} (the DDPM bound needs the discrete chain)")
    print("bits/dim of continuous latents: no dequantisation, not comparable with pixel-space bits/dim\n")


if __name__ == "__main__":
    raise SystemExit(main())
