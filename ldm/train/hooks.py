"""What the training loop does every few steps besides stepping: the held-out loss, the sample grid, the evaluation
protocol and the export. Each is built at the start of a run (so a bad setting fails before the first step), runs
when its interval comes, and agrees on failures across ranks (``distributed.on_main``) instead of waiting at a
barrier for a rank that raised."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from ldm.assemble import Components
from ldm.data.run_stream import held_out_batches
from ldm.diffusion import band_times, eps_mse
from ldm.diffusion.rng import sample_generators
from ldm.pipeline import make_grid
from ldm.train.distributed import DistInfo, sum_across_ranks


def due(step: int, every: int, last: int) -> bool:
    """An interval hook runs every ``every`` steps (0: never) and not again at the last step (the end runs it)."""
    return bool(every) and step % every == 0 and step != last


class HeldOutLoss:
    """The diffusion loss on held-out latents at fixed times and fixed noise: ``val/loss`` and one value per band.

    Sample k of the val split is evaluated at the centre time of each of ``bands`` equal bands of t (on the process's
    own training times), with noise drawn from a generator keyed by (sample key, band): every evaluation, run, and
    world size sees the same (x0, t, eps), so the curves of two runs differ only by their models. The loss is the
    eps-space mean squared error, comparable across eps/x0/v/score networks. Each rank evaluates its own share of
    the samples (padded to the same number of forwards on every rank, as ZeRO-3 needs) and the sums are reduced.
    """

    def __init__(self, parts: Components, dist: DistInfo, bands: int, max_samples: int, batch_size: int):
        self.parts, self.batch_size = parts, batch_size
        self.times = band_times(parts.process, bands)  # (bands,) float64
        loader, spec = held_out_batches(parts.cfg.data, batch_size)  # one pass in shard order, the same on every rank
        self.total, self.keys, rows = 0, [], []
        fields = ("caption", "original_size", "crop_top_left", "context", "context_mask", "pooled")
        for batch in loader:
            for i, key in enumerate(batch["key"]):
                if self.total < max_samples and self.total % dist.world_size == dist.rank:
                    rows.append({k: batch[k][i] for k in ("image", "latent", *fields) if k in batch})
                    self.keys.append(key)
                self.total += self.total < max_samples
        if self.total == 0:
            raise ValueError(f"data.val: the val split of {spec} has no samples for the held-out loss")
        with torch.no_grad():
            self.latents = torch.cat([self._latents(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
                                     ) if rows else None
        # per sample: what its condition is made of (caption or cached embeddings, size and crop)
        self.rows = [{k: v for k, v in r.items() if k not in ("image", "latent")} for r in rows]
        self.forwards = math.ceil(math.ceil(self.total / dist.world_size) / batch_size)  # the same on every rank

    def _latents(self, rows: list[dict]) -> torch.Tensor:
        if "latent" in rows[0]:
            return torch.stack([r["latent"] for r in rows]).float().to(self.parts.device)
        return self.parts.autoencoder.encode(torch.stack([r["image"] for r in rows]).to(self.parts.device)).float()

    def _cond(self, rows: list[dict], x0: torch.Tensor):
        """The condition of some held-out samples (as a training batch of theirs gets it)."""
        samples = {k: [r[k] for r in rows] if k == "caption" else torch.stack([r[k] for r in rows]) for k in rows[0]}
        return self.parts.conditioning(samples, x0)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """{"val/loss": mean over samples and bands, "val/loss_t<time>": per band} for the network ``model``."""
        p, denoiser = self.parts, self.parts.denoiser(model)
        sums = torch.zeros(len(self.times), dtype=torch.float64)
        for band, t in enumerate(self.times.tolist()):
            for j in range(self.forwards):
                rows = slice(j * self.batch_size, (j + 1) * self.batch_size)
                keys = self.keys[rows]
                if keys:
                    x0, weight = self.latents[rows], 1.0
                    cond = self._cond(self.rows[rows], x0)
                else:  # this rank has run out: a forward on a padding sample keeps ZeRO-3's collectives in step
                    x0 = torch.zeros(1, *p.latent_shape, device=p.device)
                    keys, cond, weight = ["padding"], p.conditioning.null(x0), 0.0
                mse = eps_mse(denoiser, x0, cond, p.process, t, p.cfg.diffusion.prediction,
                              sample_generators(keys, "val", band))  # (B,)
                sums[band] += weight * float(mse.double().sum())
        sums = sum_across_ranks(sums) / self.total
        out = {"val/loss": float(sums.mean())}
        out.update({f"val/loss_t{t:.3f}": float(v) for t, v in zip(self.times.tolist(), sums.tolist())})
        return out


class SampleGrid:
    """Rank 0 samples the fixed prompts and seeds with the EMA weights and CFG; saves and logs the grid."""

    def __init__(self, parts: Components, out: Path, tracker):
        self.parts, self.out, self.tracker = parts, out, tracker

    def __call__(self, ema_state: dict[str, torch.Tensor], step: int) -> str:
        s = self.parts.cfg.sampling
        pipe = self.parts.pipeline(self.parts.unet(ema_state))
        prompts = [p for p in s.prompts for _ in range(s.images_per_prompt)]
        images = pipe.generate(prompts, [s.seed + i for i in range(len(prompts))], batch_size=len(prompts),
                               progress=False, negative_prompt=s.negative_prompt, sampler=s.sampler, steps=s.steps,
                               guidance=s.guidance)
        grid = make_grid(images, nrow=s.images_per_prompt, scale=2)
        path = self.out / "samples" / f"grid_step{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        self.tracker.log_image(grid, "samples", step)
        return str(path)


class Evaluation:
    """The evaluation protocol (``ldm.eval``) on the EMA weights; its reference statistics are ready at the start."""

    def __init__(self, parts: Components, evaluator, tracker, say: Callable[[str], None]):
        self.parts, self.evaluator, self.tracker, self.say = parts, evaluator, tracker, say

    def __call__(self, ema_state: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        e = self.parts.cfg.eval
        pipe = self.parts.pipeline(self.parts.unet(ema_state))
        result = self.evaluator.evaluate(pipe, sampler=e.sampler, steps=e.steps, guidance=e.guidance)
        self.tracker.log_metrics({f"eval/{k}": v for k, v in result.metrics.items()}, step)
        self.say(f"step {step}: {result.summary()}")
        return result.metrics
