"""Likelihoods of held-out data under a trained model: per sample, log p(z | caption) through the probability-flow
ODE and the DDPM variational bound, in bits per latent dimension, with means and standard errors.

The held-out images are encoded by the model's own frozen autoencoder (posterior mode x scale factor), so every
number is about the continuous latents the diffusion model was trained on (D = C x h x w dimensions): no
dequantisation or 8-bit offset enters, bits/dim may be negative and is not comparable with pixel-space bits/dim.
The math is ``ldm.diffusion.likelihood``'s; this module runs it over a data split and records the result
(``record_likelihood``: JSON, a histogram, an MLflow run).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ldm.conditioning import expand_cond
from ldm.config import DiffusionConfig, to_dict
from ldm.data.stream import make_loader, resolve_shards
from ldm.diffusion import DiscreteVP, Predictor, ddpm_elbo, ode_likelihood
from ldm.pipeline import unet_denoiser
from ldm.report.plots import likelihood_histogram


@dataclass
class LikelihoodResult:
    rows: list[dict[str, Any]]  # one per sample: key, caption, ode_logp, ode_bpd[, elbo terms]
    summary: dict[str, float]  # means (and standard errors of the bits/dim) as flat metric names
    settings: dict[str, Any]  # how they were computed
    elbo: bool  # whether the DDPM bound was computed (discrete chains only)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def stderr(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def summarize(rows: list[dict], nfe: list[int], dim: int) -> dict[str, float]:
    """Means over samples (and standard errors of the bits/dim) as flat metric names."""
    out = {"samples": float(len(rows)), "dim": float(dim), "ode_nfe": mean([float(n) for n in nfe])}
    for key, name in (("ode_bpd", "ode_bpd"), ("ode_logp", "ode_logp_nats"), ("elbo_bpd", "elbo_bpd"),
                      ("elbo", "elbo_nats"), ("elbo_prior_kl", "elbo_prior_kl_nats"),
                      ("elbo_diffusion_kl", "elbo_diffusion_kl_nats"), ("elbo_decoder_nll", "elbo_decoder_nll_nats")):
        if key in rows[0]:
            values = [r[key] for r in rows]
            out[name] = mean(values)
            if key.endswith("bpd"):
                out[f"{name}_stderr"] = stderr(values)
    return out


def held_out_likelihood(pipe, spec: str, split: str = "val", *, image_size: int, caption: str = "label",
                        batches: int = 4, batch_size: int = 16, exact_trace: bool = False, probes: int = 1,
                        ode_steps: int | None = None, rtol: float = 1e-4, atol: float = 1e-4, elbo: bool = True,
                        elbo_terms: int | None = None, elbo_variance: str = "small", unconditional: bool = False,
                        seed: int = 0) -> LikelihoodResult:
    """ODE log-likelihood (RK45 with rtol/atol, or RK4 with ode_steps) and the DDPM bound of ``batches`` batches."""
    process = pipe.process
    if elbo_terms is not None and isinstance(process, DiscreteVP) and elbo_terms > process.T - 1:
        raise ValueError(f"elbo_terms: the chain has {process.T - 1} step terms, got {elbo_terms}")
    loader = make_loader(resolve_shards(spec, split), batch_size=batch_size, image_size=image_size, seed=seed,
                         shuffle_buffer=0, caption=caption)  # one pass in shard order
    elbo_on = elbo and isinstance(process, DiscreteVP)
    evaluations = tqdm(desc="network evaluations", unit="eval", leave=False)  # the slow part: show it moving
    network = unet_denoiser(pipe.unet)

    def counted(x, t, c):
        evaluations.update(1)
        return network(x, t, c)

    model = Predictor(counted, process, pipe.prediction)
    time = "logsnr" if math.isfinite(float(process.log_snr_half(1.0))) else "t"  # zero terminal SNR: in t
    solver = dict(method="rk4", steps=ode_steps) if ode_steps else dict(rtol=rtol, atol=atol)
    generator = torch.Generator().manual_seed(seed)
    device, ae_dtype = pipe.device, next(pipe.autoencoder.parameters()).dtype
    rows, nfe = [], []
    bar = tqdm(total=batches, desc="likelihood", unit="batch")
    for batch in loader:
        if len(nfe) == batches:
            break
        B = len(batch["caption"])
        with torch.no_grad():
            z = pipe.autoencoder.encode(batch["image"].to(device, ae_dtype)).float()  # (B, C, h, w)
            cond = expand_cond(pipe.null_cond, B) if unconditional else pipe.text_encoder(batch["caption"])
            cond = {k: v.to(device) for k, v in cond.items()}
        ode = ode_likelihood(model, z, cond, exact_trace=exact_trace, probes=probes, generator=generator, time=time,
                             **solver)
        nfe.append(ode.nfe)
        bound = ddpm_elbo(model, z, cond, variance=elbo_variance, terms=elbo_terms,
                          generator=generator) if elbo_on else None
        for i in range(B):
            row = {"key": batch["key"][i], "caption": batch["caption"][i],
                   "ode_logp": float(ode.logp[i]), "ode_bpd": float(ode.bpd[i])}
            if bound is not None:
                row.update(elbo=float(bound.elbo[i]), elbo_bpd=float(bound.bpd[i]),
                           elbo_prior_kl=float(bound.prior[i]), elbo_diffusion_kl=float(bound.diffusion[i]),
                           elbo_decoder_nll=float(bound.decoder[i]))
            rows.append(row)
        bar.update(1)
        bar.set_postfix(ode_bpd=f"{mean([r['ode_bpd'] for r in rows]):.3f}",
                        **({"elbo_bpd": f"{mean([r['elbo_bpd'] for r in rows]):.3f}"} if elbo_on else {}))
    bar.close()
    evaluations.close()
    if not rows:
        raise ValueError(f"{spec}: no samples in split {split!r}")
    dim = math.prod(pipe.latent_shape)
    terms = "all terms" if elbo_terms is None else f"{elbo_terms} stratified terms"
    settings = {"data": str(spec), "split": split, "samples": len(rows), "latent_shape": list(pipe.latent_shape),
                "dim": dim, "seed": seed, "condition": "null" if unconditional else "caption", "ode_time": time,
                "ode_solver": f"rk4 x {ode_steps}" if ode_steps else f"rk45 rtol={rtol} atol={atol}",
                "trace": "exact" if exact_trace else f"hutchinson x {probes}",
                "elbo": f"{terms}, {elbo_variance} variance" if elbo_on else "off"}
    return LikelihoodResult(rows, summarize(rows, nfe, dim), settings, elbo_on)


def record_likelihood(result: LikelihoodResult, settings: dict[str, Any], out: str | Path, tracker,
                      diffusion: DiffusionConfig) -> list[Path]:
    """Write ``<out>/likelihood.json`` (settings, summary, per-sample values) and ``<out>/likelihood.png`` (per-sample
    bits/dim), and log both with ``likelihood/*`` metrics as a run of ``tracker`` (params: the settings and the
    model's diffusion section). Returns the two files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "likelihood.json", out / "likelihood.png"]
    files[0].write_text(json.dumps({"settings": settings, "summary": result.summary, "samples": result.rows},
                                   indent=2))
    title = f"{len(result.rows)} {settings['split']} samples, D = {settings['dim']}"
    likelihood_histogram(result.rows, files[1], title)
    tracker.start({"likelihood": settings, "model_config": {"diffusion": to_dict(diffusion)}},
                  tags={"ldm.likelihood": "true"})
    tracker.log_metrics({f"likelihood/{k}": v for k, v in result.summary.items()}, step=0)
    for file in files:
        tracker.log_artifact(file, "likelihood")
    tracker.end()
    return files
