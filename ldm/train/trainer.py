"""The LDM training loop: the one place where data, frozen encoders, diffusion math, DeepSpeed and MLflow meet.

Per step: images -> frozen autoencoder latents (x scale factor), captions -> frozen text-encoder tokens with
conditioning dropout -> diffusion loss on the UNet (a DeepSpeed engine: ZeRO, bf16, accumulation, clipping)
-> EMA update; periodic logging, checkpoints, validation grids; export at the end.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from ldm.builders import build_objective, build_process, build_text_encoder, build_unet
from ldm.conditioning import conditioning_dropout, null_condition
from ldm.config import ConfigError, LDMConfig, TrainConfig, save_config, to_dict
from ldm.pipeline import TextToImage, make_grid, unet_denoiser
from ldm.tracking import Tracker
from ldm.train.checkpoint import Checkpointer
from ldm.train.distributed import DistInfo, any_across_ranks, barrier, init_distributed, mean_across_ranks
from ldm.train.ema import EMA

log = logging.getLogger(__name__)
TEXT_CACHE_SIZE = 200_000  # captions whose embeddings are kept (16 tokens x 384-d: ~25 kB each)


class TrainingDiverged(RuntimeError):
    """Non-finite losses or weights persisted and no rollback is left."""


class StopRequest:
    """Records SIGUSR1 (SLURM's pre-emption warning) or SIGTERM; the loop checkpoints and exits at a step boundary."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def requeue() -> None:
    """Run $LDM_REQUEUE_CMD (e.g. `scontrol requeue $SLURM_JOB_ID`) once the checkpoint is complete."""
    cmd = os.environ.get("LDM_REQUEUE_CMD")
    if cmd:
        log.warning("requeueing: %s", cmd)
        subprocess.run(cmd, shell=True, check=False)


def deepspeed_config(cfg: TrainConfig, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed JSON config from the typed training section (extra keys in train.deepspeed win)."""
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        # torch's fused AdamW (CPU and CUDA): one kernel over all tensors, 4x faster than the per-tensor loop
        # on CPU (5.0 vs 20.6 ms per step for the emoji-cpu UNet); under ZeRO and bf16 it updates the fp32
        # master partitions.
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay, "torch_adam": True,
                                                  "fused": True}},
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, cfg.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then constant or cosine decay to zero at max_steps (multiplier of the base LR)."""

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return fn


class Trainer:
    def __init__(self, cfg: LDMConfig, dist: DistInfo | None = None):
        import deepspeed

        from autoencoder import load_pretrained

        self.cfg = cfg
        self.dist = dist or init_distributed(cfg.run.device)
        self.out = Path(cfg.run.output_dir)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        device = self.dist.device

        self.autoencoder = load_pretrained(cfg.autoencoder.path, device=device)
        if cfg.data.latents is not None:  # stale latents would train silently wrong: refuse at start
            from ldm.data.latents import check_latent_cache, folder_hash

            try:
                check_latent_cache(cfg.data.latents, folder_hash(cfg.autoencoder.path))
            except ValueError as e:
                raise ConfigError(f"data.latents: {e}") from None
        self.text_encoder = build_text_encoder(cfg.text_encoder, device)
        self.null_cond = null_condition(self.text_encoder)  # (1, L, D): the null condition, saved with the model
        self.process = build_process(cfg.diffusion)
        self.objective = build_objective(cfg.diffusion, self.process)  # loss(denoiser, x0, cond, generators)
        latent_channels = self.autoencoder.config["latent_channels"]
        size = cfg.data.image_size // self.autoencoder.downsample_factor
        self.latent_shape = (latent_channels, size, size)
        unet = build_unet(cfg.model, latent_channels, self.text_encoder.dim)

        self.engine, *_ = deepspeed.initialize(
            model=unet, model_parameters=[p for p in unet.parameters() if p.requires_grad],
            config=deepspeed_config(cfg.train, cfg.data.batch_size),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train)),
        )
        self.ema = EMA(self.engine.module, cfg.train.ema_decay)
        self.checkpointer = Checkpointer(self.out / "checkpoints", self.dist.rank, cfg.train.keep_last)
        self.step, self.epoch, self.run_id, self.samples_seen = 0, 0, None, 0
        self.epoch_batches = 0  # micro-batches of the current data epoch already consumed (the data position)
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.nonfinite_steps, self.bad_in_a_row, self.rollbacks = 0, 0, 0
        state = self.checkpointer.load(self.engine, self.ema)
        if state is not None:
            self.step, self.epoch, self.run_id = state["step"], state["epoch"], state.get("run_id")
            self.epoch_batches = self._replace_position(state)
            self.samples_seen = state.get("samples_seen", 0)
            self._print(f"resumed from {self.checkpointer.root / self.checkpointer.latest()} at step {self.step}")
        self.tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name,
                               enabled=self.dist.is_main and cfg.tracking.enabled)
        self.stop = StopRequest()  # from here on a pre-emption signal means: checkpoint and exit

    # --- helpers -------------------------------------------------------------------------------------
    def _print(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(msg)

    def _batches(self) -> Iterator[dict]:
        """Endless per-rank stream: epochs of equal batch counts on every rank (no DDP hang on uneven shards).

        The stream is a pure function of (seed, epoch, rank, worker), so the position is (epoch, batches
        consumed): a resumed run re-opens its epoch and skips what it had consumed, continuing exactly.
        """
        from ldm.data import make_loader, resolve_shards

        latents = self.cfg.data.latents is not None
        urls = resolve_shards(self.cfg.data.latents or self.cfg.data.train, "train")
        per_epoch = self.batches_per_epoch
        while True:
            loader = make_loader(urls, batch_size=self.cfg.data.batch_size, image_size=self.cfg.data.image_size,
                                 seed=self.cfg.run.seed, rank=self.dist.rank, world_size=self.dist.world_size,
                                 num_workers=self.cfg.data.num_workers, shuffle_buffer=self.cfg.data.shuffle_buffer,
                                 batches_per_epoch=per_epoch, caption=self.cfg.data.caption, flip=self.cfg.data.flip,
                                 epoch=self.epoch, latents=latents)
            for i, batch in enumerate(loader):
                if i < self.epoch_batches:
                    continue  # consumed before the checkpoint we resumed from
                self.epoch_batches = i + 1
                yield batch
            self.epoch += 1
            self.epoch_batches = 0

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per data epoch on each rank: data.batches_per_epoch, else one pass over the train split."""
        from ldm.data import dataset_size

        if self.cfg.data.batches_per_epoch:
            return self.cfg.data.batches_per_epoch
        total = dataset_size(self.cfg.data.latents or self.cfg.data.train, "train")
        if total is None:
            return 1000
        return max(1, total // (self.cfg.data.batch_size * self.dist.world_size))

    def _replace_position(self, state: dict[str, Any]) -> int:
        """Micro-batches of the current epoch to skip; re-placed when the checkpoint has another data layout.

        Each rank streams its own split of the shards, so a different world size or micro-batch splits the
        epoch differently: the run continues after the same number of the epoch's samples, not the same samples.
        """
        layout = (state.get("world_size", self.dist.world_size), state.get("micro_batch", self.cfg.data.batch_size))
        if layout == (self.dist.world_size, self.cfg.data.batch_size):
            return state.get("epoch_batches", 0)
        consumed = state.get("epoch_batches", 0) * layout[0] * layout[1]  # samples of this epoch, all ranks
        batches = min(consumed // (self.dist.world_size * self.cfg.data.batch_size), self.batches_per_epoch)
        self._print(f"warning: checkpoint written by {layout[0]} processes x micro-batch {layout[1]}, resuming on "
                    f"{self.dist.world_size} x {self.cfg.data.batch_size}: weights, optimizer, EMA and LR schedule "
                    f"are exact; the data stream is re-split, continuing epoch {state['epoch']} after {batches} "
                    "micro-batches per process")
        return batches

    def _trainer_state(self) -> dict[str, Any]:
        epoch, consumed = self.epoch, self.epoch_batches
        if consumed >= self.batches_per_epoch:  # the epoch is complete
            epoch, consumed = epoch + 1, 0
        return {"step": self.step, "epoch": epoch, "run_id": self.tracker.run_id or self.run_id,
                "samples_seen": self.samples_seen,
                "zero_stage": self.cfg.train.zero_stage, "world_size": self.dist.world_size,
                "micro_batch": self.cfg.data.batch_size,
                "epoch_batches": consumed}

    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Frozen text-encoder outputs, memoised per caption (the encoder is deterministic, so this is exact)."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            if len(self._text_cache) + len(missing) > TEXT_CACHE_SIZE:
                self._text_cache.clear()
            out = self.text_encoder(missing)
            for i, c in enumerate(missing):
                self._text_cache[c] = (out["context"][i], out["context_mask"][i])
        return {"context": torch.stack([self._text_cache[c][0] for c in captions]),  # (B, L, D)
                "context_mask": torch.stack([self._text_cache[c][1] for c in captions])}  # (B, L)

    def sample_generators(self, keys: list[str]) -> list[torch.Generator]:
        """One generator per sample, seeded by (run seed, rollbacks, optimizer step, sample key).

        Every random draw of a sample (condition dropout, t, eps) comes from its own generator, so training
        does not depend on how samples are split into micro-batches and ranks: 2 processes x batch b compute
        what 1 process x batch 2b computes, and a run resumed on another world size keeps its noise.
        """
        prefix = f"{self.cfg.run.seed}/{self.rollbacks}/{self.step}/"
        return [torch.Generator().manual_seed(int.from_bytes(
            hashlib.blake2b((prefix + key).encode(), digest_size=8).digest(), "little")) for key in keys]

    def micro_step(self, batch: dict) -> float:
        """One forward/backward on a micro-batch; DeepSpeed steps the optimizer at accumulation boundaries."""
        d = self.cfg.diffusion
        with torch.no_grad():
            if "latent" in batch:  # pre-encoded by the same (hash-checked) autoencoder
                z = batch["latent"].to(self.dist.device)  # (B, C, h, w) scaled latents
            else:
                z = self.autoencoder.encode(batch["image"].to(self.dist.device))  # (B, C, h, w) scaled latents
            cond = self.encode_captions(batch["caption"])  # (B, L, D) + (B, L)
        generators = self.sample_generators(batch["key"])
        cond = conditioning_dropout(cond, self.null_cond, d.cond_dropout, generators)
        denoiser = unet_denoiser(self.engine)
        loss = self.objective(denoiser, z, cond, generators)
        if any_across_ranks(not bool(torch.isfinite(loss.detach()))):
            # skip this micro-batch on every rank: a zero loss through a finite input gives exactly zero
            # gradients and keeps DeepSpeed's accumulation bookkeeping in step
            t0 = torch.zeros(z.shape[0], device=z.device)
            loss = denoiser(torch.zeros_like(z), t0, cond).sum() * 0.0
            self.engine.backward(loss)
            self.engine.step()
            return float("nan")
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach())

    def weights_finite(self) -> bool:
        """True on every rank when no rank holds a non-finite parameter (its own partition under ZeRO-3)."""
        local = all(bool(torch.isfinite(getattr(p, "ds_tensor", p.data)).all())
                    for p in self.engine.module.parameters())
        return not any_across_ranks(not local)

    def rollback_or_stop(self, reason: str) -> None:
        """Reload the last complete checkpoint, or raise TrainingDiverged when none (or no rollback) is left."""
        latest = self.checkpointer.latest()
        if latest is None or self.rollbacks >= self.cfg.train.max_rollbacks:
            raise TrainingDiverged(f"{reason} at step {self.step}; "
                                   + ("no checkpoint to roll back to" if latest is None
                                      else f"already rolled back {self.rollbacks} times (train.max_rollbacks)"))
        state = self.checkpointer.load(self.engine, self.ema, latest)
        self.rollbacks += 1
        log.warning("%s at step %d: rolled back to %s (rollback %d of %d)", reason, self.step, latest,
                    self.rollbacks, self.cfg.train.max_rollbacks)
        self.step, self.epoch, self.samples_seen = state["step"], state["epoch"], state["samples_seen"]
        self.epoch_batches = self._replace_position(state)
        self.bad_in_a_row = 0

    # --- the loop ------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train to train.max_steps (resuming where a checkpoint left off), validate, export."""
        cfg, t = self.cfg, self.cfg.train
        if self.dist.is_main:
            from safetensors.torch import save_file

            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            save_file({k: v.cpu().contiguous() for k, v in self.null_cond.items()}, str(self.out / "null_condition.safetensors"))
        self.run_id = self.tracker.start(to_dict(cfg), run_id=self.run_id,
                                         tags={"world_size": str(self.dist.world_size)}) or self.run_id
        global_batch = cfg.data.batch_size * t.grad_accum * self.dist.world_size
        batches = self._batches()
        bar = tqdm(total=t.max_steps, initial=self.step, desc="ldm", disable=not self.dist.is_main, dynamic_ncols=True)
        try:
            return self._loop(bar, batches, global_batch, self.stop)
        finally:
            self.stop.restore()

    def _loop(self, bar, batches, global_batch: int, stop: StopRequest) -> dict[str, Any]:
        t = self.cfg.train
        window, first_loss, last_loss, tick, skipped = [], None, None, time.time(), 0
        while self.step < t.max_steps:
            losses = []
            for _ in range(t.grad_accum):
                batch = next(batches)
                skipped = batch.get("skipped", skipped)
                losses.append(self.micro_step(batch))
            finite = [v for v in losses if math.isfinite(v)]
            window += finite
            if len(finite) < len(losses):
                self.nonfinite_steps += 1
                self.bad_in_a_row += 1
            else:
                self.bad_in_a_row = 0
            self.step += 1
            self.samples_seen += global_batch
            if self.bad_in_a_row >= t.max_bad_steps or not self.weights_finite():
                reason = (f"non-finite loss in {self.bad_in_a_row} consecutive steps" if self.bad_in_a_row
                          else "non-finite weights")
                self.rollback_or_stop(reason)
                batches = self._batches()
                bar.reset(total=t.max_steps)
                bar.update(self.step)
                continue
            self.ema.update(self.step)
            bar.update(1)
            if (self.step % t.log_every == 0 or self.step == t.max_steps or self.step == 1) and window:
                loss = mean_across_ranks(sum(window) / len(window))
                first_loss = loss if first_loss is None else first_loss
                last_loss = loss
                elapsed = time.time() - tick
                metrics = {"train/loss": loss, "train/lr": self.engine.get_lr()[0],
                           "train/samples_per_s": global_batch * len(window) / t.grad_accum / max(elapsed, 1e-9),
                           "train/skipped_samples": skipped, "train/nonfinite_steps": self.nonfinite_steps,
                           "train/rollbacks": self.rollbacks}
                grad_norm = self.engine.get_global_grad_norm()
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                self.tracker.log_metrics(metrics, self.step)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step == 1:
                    self._print(f"step 1: loss {loss:.4f}")
                window, tick = [], time.time()
            if any_across_ranks(stop.signum is not None):
                self.checkpointer.save(self.engine, self.ema, self.step, self._trainer_state())
                bar.close()
                self._print(f"signal received: checkpointed step {self.step}; exiting for requeue")
                if self.dist.is_main:
                    requeue()
                self.tracker.end("KILLED")
                return {"first_loss": first_loss, "last_loss": last_loss, "grid": None, "export": None,
                        "run_id": self.tracker.run_id, "preempted": True, "step": self.step}
            if self.step % t.ckpt_every == 0 or self.step == t.max_steps:
                self.checkpointer.save(self.engine, self.ema, self.step, self._trainer_state())
            if t.sample_every and self.step % t.sample_every == 0 and self.step != t.max_steps:
                self.validate()
            if self.cfg.eval.every and self.step % self.cfg.eval.every == 0:
                self.evaluate()
        bar.close()
        self._print(f"step {self.step}: loss {last_loss:.4f}" if last_loss is not None else "nothing to train")
        grid = self.validate()
        export = self.export()
        self.tracker.end()
        return {"first_loss": first_loss, "last_loss": last_loss, "grid": grid, "export": export,
                "run_id": self.tracker.run_id, "preempted": False, "step": self.step}

    # --- validation and export -----------------------------------------------------------------------
    def ema_unet(self, ema_state: dict[str, torch.Tensor]) -> torch.nn.Module:
        unet = build_unet(self.cfg.model, self.latent_shape[0], self.text_encoder.dim)
        unet.load_state_dict(ema_state)
        return unet.to(self.dist.device).eval().requires_grad_(False)

    def validate(self) -> str | None:
        """Rank 0 samples the fixed prompts and seeds with the EMA weights and CFG; logs and saves the grid."""
        path = None
        ema_state = self.ema.full_state_dict()  # collective under ZeRO-3
        if self.dist.is_main:
            s = self.cfg.sampling
            pipe = TextToImage(self.ema_unet(ema_state), self.autoencoder, self.text_encoder, self.process,
                               self.cfg.diffusion.prediction, self.null_cond, self.latent_shape)
            prompts = [p for p in s.prompts for _ in range(s.images_per_prompt)]
            seeds = [s.seed + i for i in range(len(prompts))]
            images = pipe(prompts, seeds=seeds, negative_prompt=s.negative_prompt, sampler=s.sampler,
                          steps=s.steps, guidance=s.guidance)
            grid = make_grid(images, nrow=s.images_per_prompt, scale=2)
            path = self.out / "samples" / f"grid_step{self.step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
            self.tracker.log_image(grid, "samples", self.step)
            path = str(path)
        barrier()
        return path

    def evaluate(self) -> dict[str, float] | None:
        """Rank 0 generates the eval prompt set with the EMA weights and logs FID/KID/probe accuracy as eval/*.

        The real reference set and the probe are loaded (computed and cached the first time) at the first call.
        """
        metrics = None
        ema_state = self.ema.full_state_dict()  # collective under ZeRO-3
        if self.dist.is_main:
            from ldm.eval import Evaluator

            e, d = self.cfg.eval, self.cfg.data
            if getattr(self, "_evaluator", None) is None:
                self._evaluator = Evaluator(e.data or d.val, image_size=d.image_size, train_data=d.train, split=e.split,
                                            caption=d.caption, num_images=e.num_images, seed=e.seed,
                                            inception=e.inception, probe=e.probe, probe_per_class=e.probe_per_class,
                                            clip=e.clip, clip_model=e.clip_model, batch_size=e.batch_size,
                                            cache_dir=e.cache_dir, device=self.dist.device)
            pipe = TextToImage(self.ema_unet(ema_state), self.autoencoder, self.text_encoder, self.process,
                               self.cfg.diffusion.prediction, self.null_cond, self.latent_shape)
            metrics = self._evaluator.evaluate(pipe, sampler=e.sampler, steps=e.steps, guidance=e.guidance).metrics
            self.tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, self.step)
            self._print(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        barrier()
        return metrics

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The trained weights in full on every rank (gathered from the partitions under ZeRO-3)."""
        import deepspeed

        module = self.engine.module
        if self.cfg.train.zero_stage != 3:
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {n: p.detach().clone() for n, p in module.named_parameters()}

    def export(self) -> str | None:
        from ldm.export import save_export

        folder = None
        ema_state = self.ema.full_state_dict()  # collective under ZeRO-3
        unet_state = self.full_model_state()
        if self.dist.is_main:
            folder = save_export(self.out / "export", self.cfg, unet_state, ema_state,
                                 self.null_cond, self.cfg.autoencoder.path)
            self.tracker.log_artifact(folder, "export")
            version = self.tracker.register_model(self.cfg.run.name, "export")
            if version:
                self._print(f"registered model version models:/{self.cfg.run.name}/{version}")
            folder = str(folder)
        barrier()
        return folder
