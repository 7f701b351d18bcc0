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
import json
import math
import os
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
    args = parse(argv)

    def body() -> int:
        import torch
        from tqdm import tqdm

        from ldm.conditioning import expand_cond
        from ldm.config import to_dict
        from ldm.data.stream import make_loader, resolve_shards
        from ldm.diffusion import DiscreteVP, Predictor, ddpm_elbo, ode_likelihood
        from ldm.pipeline import unet_denoiser
        from ldm.tracking import Tracker, default_tracking_uri

        pipe, cfg = load_model(args.model, args.device, args.tracking_uri, args.raw_weights)
        device = pipe.device
        spec = args.data or cfg.data.val
        if not spec:
            usage_error("the model's config has no data.val: pass --data with held-out shards")
        try:
            urls = resolve_shards(spec, args.split)
        except ValueError as e:
            usage_error(f"--data: {e}")
        loader = make_loader(urls, batch_size=args.batch_size, image_size=cfg.data.image_size, seed=args.seed,
                             shuffle_buffer=0, caption=cfg.data.caption)  # one pass in shard order
        process = pipe.process
        elbo_on = args.elbo and isinstance(process, DiscreteVP)
        evaluations = tqdm(desc="network evaluations", unit="eval", leave=False)  # the slow part: show it moving
        network = unet_denoiser(pipe.unet)

        def counted(x, t, c):
            evaluations.update(1)
            return network(x, t, c)

        model = Predictor(counted, process, pipe.prediction)
        time = "logsnr" if math.isfinite(float(process.log_snr_half(1.0))) else "t"  # zero terminal SNR: in t
        solver = dict(method="rk4", steps=args.ode_steps) if args.ode_steps else dict(rtol=args.rtol, atol=args.atol)
        generator = torch.Generator().manual_seed(args.seed)
        ae_dtype = next(pipe.autoencoder.parameters()).dtype

        rows, nfe = [], []
        bar = tqdm(total=args.batches, desc="likelihood", unit="batch")
        for batch in loader:
            if len(nfe) == args.batches:
                break
            B = len(batch["caption"])
            with torch.no_grad():
                z = pipe.autoencoder.encode(batch["image"].to(device, ae_dtype)).float()  # (B, C, h, w)
                cond = expand_cond(pipe.null_cond, B) if args.unconditional else pipe.text_encoder(batch["caption"])
                cond = {k: v.to(device) for k, v in cond.items()}
            ode = ode_likelihood(model, z, cond, exact_trace=args.exact_trace, probes=args.hutchinson_probes,
                                 generator=generator, time=time, **solver)
            nfe.append(ode.nfe)
            elbo = ddpm_elbo(model, z, cond, variance=args.elbo_variance, terms=args.elbo_terms,
                             generator=generator) if elbo_on else None
            for i in range(B):
                row = {"key": batch["key"][i], "caption": batch["caption"][i],
                       "ode_logp": float(ode.logp[i]), "ode_bpd": float(ode.bpd[i])}
                if elbo is not None:
                    row.update(elbo=float(elbo.elbo[i]), elbo_bpd=float(elbo.bpd[i]),
                               elbo_prior_kl=float(elbo.prior[i]), elbo_diffusion_kl=float(elbo.diffusion[i]),
                               elbo_decoder_nll=float(elbo.decoder[i]))
                rows.append(row)
            bar.update(1)
            bar.set_postfix(ode_bpd=f"{_mean([r['ode_bpd'] for r in rows]):.3f}",
                            **({"elbo_bpd": f"{_mean([r['elbo_bpd'] for r in rows]):.3f}"} if elbo_on else {}))
        bar.close()
        evaluations.close()
        if not rows:
            usage_error(f"--data: no samples in split {args.split!r} of {spec}")

        dim = math.prod(pipe.latent_shape)
        summary = _summary(rows, nfe, dim)
        terms = "all terms" if args.elbo_terms is None else f"{args.elbo_terms} stratified terms"
        settings = {
            "model": str(Path(args.model).resolve()), "data": str(spec), "split": args.split, "samples": len(rows),
            "latent_shape": list(pipe.latent_shape), "dim": dim, "seed": args.seed,
            "condition": "null" if args.unconditional else "caption", "weights": "raw" if args.raw_weights else "ema",
            "ode_time": time,
            "ode_solver": f"rk4 x {args.ode_steps}" if args.ode_steps else f"rk45 rtol={args.rtol} atol={args.atol}",
            "trace": "exact" if args.exact_trace else f"hutchinson x {args.hutchinson_probes}",
            "elbo": f"{terms}, {args.elbo_variance} variance" if elbo_on else "off",
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "likelihood.json").write_text(json.dumps({"settings": settings, "summary": summary, "samples": rows},
                                                        indent=2))
        _histogram(rows, out / "likelihood.png", f"{len(rows)} {args.split} samples, D = {dim}")
        _print_table(settings, summary, elbo_on, args.elbo and not elbo_on, type(process).__name__)

        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or default_tracking_uri()
        tracker = Tracker(uri, args.experiment or cfg.tracking.experiment, f"likelihood-{cfg.run.name}",
                          enabled=args.tracking)
        run_id = tracker.start({"likelihood": settings, "model_config": {"diffusion": to_dict(cfg.diffusion)}},
                               tags={"ldm.likelihood": "true"})
        tracker.log_metrics({f"likelihood/{k}": v for k, v in summary.items()}, step=0)
        tracker.log_artifact(out / "likelihood.json", "likelihood")
        tracker.log_artifact(out / "likelihood.png", "likelihood")
        tracker.end()
        print(f"wrote {out / 'likelihood.json'} and {out / 'likelihood.png'}"
              + (f"; logged run {run_id} to {uri}" if run_id else ""))
        return 0

    return run_main(body)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _stderr(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def _summary(rows: list[dict], nfe: list[int], dim: int) -> dict[str, float]:
    """Means over samples (and standard errors of the bits/dim) as flat metric names."""
    out = {"samples": float(len(rows)), "dim": float(dim), "ode_nfe": _mean([float(n) for n in nfe])}
    for key, name in (("ode_bpd", "ode_bpd"), ("ode_logp", "ode_logp_nats"), ("elbo_bpd", "elbo_bpd"),
                      ("elbo", "elbo_nats"), ("elbo_prior_kl", "elbo_prior_kl_nats"),
                      ("elbo_diffusion_kl", "elbo_diffusion_kl_nats"), ("elbo_decoder_nll", "elbo_decoder_nll_nats")):
        if key in rows[0]:
            values = [r[key] for r in rows]
            out[name] = _mean(values)
            if key.endswith("bpd"):
                out[f"{name}_stderr"] = _stderr(values)
    return out


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


def _histogram(rows: list[dict], path: Path, title: str) -> None:
    """Per-sample bits/dim, ODE and (when computed) ELBO, as one PNG (matplotlib's object API, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series = [("ODE log-likelihood", "ode_bpd")]
    if "elbo_bpd" in rows[0]:
        series.append(("ELBO (upper bound)", "elbo_bpd"))
    for label, key in series:
        values = [r[key] for r in rows]
        ax.hist(values, bins=max(5, min(40, len(values) // 2)), alpha=0.6,
                label=f"{label}: mean {_mean(values):.3f}")
        ax.axvline(_mean(values), color=ax.patches[-1].get_facecolor(), linestyle="--", linewidth=1)
    ax.set_xlabel("bits per latent dimension (-log p / (D ln 2))")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
