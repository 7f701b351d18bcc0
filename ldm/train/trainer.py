"""The LDM training loop: where data, the assembled model parts, DeepSpeed and MLflow meet.

Per step: images -> frozen autoencoder latents (or cached ones), captions -> frozen text-encoder tokens (or cached)
with conditioning dropout -> the objective on the UNet (a DeepSpeed engine: ZeRO, bf16, accumulation, clipping) -> EMAs;
then the hooks (log, checkpoint, held-out loss, grid, evaluation); the export. All is built and checked in __init__.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from ldm.assemble import assemble, build_evaluator, check_inputs
from ldm.conditioning import conditioning_dropout
from ldm.config import LDMConfig, save_config, to_dict
from ldm.data.run_stream import DataPosition, batch_stream
from ldm.diffusion.rng import sample_generators
from ldm.io import save_tensors
from ldm.tracking import Tracker
from ldm.train import hooks
from ldm.train.checkpoint import Checkpointer
from ldm.train.distributed import DistInfo, any_across_ranks, init_distributed, mean_across_ranks, on_main
from ldm.train.ema import EMA
from ldm.train.engine import build_engine, full_state, weights_finite
from ldm.train.export import export_trained
from ldm.train.guards import NonFiniteGuard, TrainingDiverged, skip_micro_batch  # noqa: F401 - re-exported
from ldm.train.preemption import StopRequest, agreed_action, exit_code, run_requeue

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: LDMConfig, dist: DistInfo | None = None):
        check_inputs(cfg)  # paths, shards and sizes, before anything loads
        self.cfg, train_cfg = cfg, cfg.train
        self.dist = dist or init_distributed(cfg.run.device)
        self.out = Path(cfg.run.output_dir)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.parts = assemble(cfg, self.dist.device, training=True)  # with a text cache: no text encoder loads
        self.engine = build_engine(self.parts.unet(), train_cfg, cfg.data.batch_size, self.dist.device)
        self.ema = EMA(self.engine.module, train_cfg.ema_decay, train_cfg.power_ema)  # with EDM2's power EMAs if set
        self.checkpointer = Checkpointer(self.out / "checkpoints", self.dist.rank, train_cfg.keep_last,
                                         train_cfg.power_snapshot_every)
        self.position = DataPosition.of(cfg.data, self.dist.world_size, train_cfg.grad_accum)
        self._print("\n".join(self.position.report))  # the bucket plan: what happens to every image
        self.guard = NonFiniteGuard(train_cfg.max_bad_steps, train_cfg.max_rollbacks)
        self.step, self.samples_seen, self.run_id = 0, 0, None
        state = self.checkpointer.load(self.engine, self.ema)
        if state is not None:
            self._restore(state)
            self._print(f"resumed from {self.checkpointer.root / self.checkpointer.latest()} at step {self.step}")
        self.tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name,
                               enabled=self.dist.is_main and cfg.tracking.enabled)
        self.held_out = (hooks.HeldOutLoss(self.parts, self.dist, train_cfg.val_bands, train_cfg.val_samples,
                                           cfg.data.batch_size) if train_cfg.val_every else None)
        evaluating = bool(cfg.eval.every or cfg.eval.final)
        evaluator = on_main(lambda: build_evaluator(cfg, self.dist.device) if evaluating else None,
                            "building the evaluation protocol")
        # every rank has the hook (its EMA gathering is collective); only rank 0 holds the evaluator
        self.evaluation = hooks.Evaluation(self.parts, evaluator, self.tracker, self._print) if evaluating else None
        self.grid = hooks.SampleGrid(self.parts, self.out, self.tracker)
        self.skipped: dict[int, int] = {}  # data-loader worker -> bad samples it skipped so far
        self.stop = StopRequest()  # from here on a pre-emption signal means: checkpoint and exit

    nonfinite_steps = property(lambda self: self.guard.nonfinite_steps)  # the guard's counters, read off the trainer
    rollbacks = property(lambda self: self.guard.rollbacks)

    def _print(self, msg: str | None) -> None:
        if self.dist.is_main and msg:
            tqdm.write(msg)

    def _restore(self, state: dict[str, Any]) -> None:
        self.step, self.run_id = state["step"], state.get("run_id") or self.run_id
        self.samples_seen = state.get("samples_seen", 0)
        self._print(self.position.restore(state, self.dist.world_size, self.cfg.data.batch_size))  # layout warning

    def _batches(self) -> Iterator[dict]:
        """This rank's endless stream of micro-batches from the current data position on."""
        pin = self.cfg.data.pin_memory and self.dist.device.type == "cuda"  # then copies to the GPU need not wait
        return batch_stream(self.cfg.data, self.cfg.run.seed, self.dist.rank, self.dist.world_size, self.position, pin)

    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "run_id": self.tracker.run_id or self.run_id, "samples_seen": self.samples_seen,
                "zero_stage": self.cfg.train.zero_stage, "world_size": self.dist.world_size,
                "micro_batch": self.cfg.data.batch_size, **self.position.state()}

    def micro_step(self, batch: dict) -> torch.Tensor | None:
        """One forward/backward on a micro-batch; DeepSpeed steps the optimizer at accumulation boundaries. Returns the
        loss on the device (read by the host only when logged), None for a micro-batch skipped as non-finite."""
        p = self.parts
        with torch.no_grad():
            if "latent" in batch:  # pre-encoded by the same (hash-checked) autoencoder
                z = batch["latent"].to(p.device, non_blocking=True)  # (B, C, h, w) scaled latents
            else:
                z = p.autoencoder.encode(batch["image"].to(p.device, non_blocking=True))  # (B, C, h, w) scaled latents
            cond = p.conditioning(batch, z)  # cached or encoded text (B, L, D), (B, L)[, (B, P), time_ids (B, 6)]
        # every random draw of a sample comes from its own generator: the same on any number of ranks
        generators = sample_generators(batch["key"], self.cfg.run.seed, self.guard.rollbacks, self.step)
        cond = conditioning_dropout(cond, p.null_cond, self.cfg.diffusion.cond_dropout, generators)
        denoiser = p.denoiser(self.engine)
        loss = p.objective(denoiser, z, cond, generators)
        if any_across_ranks(~torch.isfinite(loss.detach())):  # a micro-step's one host sync: after the collective
            skip_micro_batch(self.engine, denoiser, z, cond)  # on every rank, so accumulation stays in step
            return None
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def save_checkpoint(self) -> None:
        """A checkpoint of this step on every rank; never from non-finite weights (those roll back instead)."""
        if not weights_finite(self.engine.module):
            self._roll_back("non-finite weights")
            return
        self.checkpointer.save(self.engine, self.ema, self.step, self._trainer_state())

    def _roll_back(self, reason: str) -> None:
        latest = self.guard.rollback_or_raise(reason, self.step, self.checkpointer.latest())
        state = self.checkpointer.load(self.engine, self.ema, latest)
        log.warning("%s at step %d: rolled back to %s (rollback %d of %d)", reason, self.step, latest,
                    self.guard.rollbacks, self.guard.max_rollbacks)
        self._restore(state)
        self._stream = self._batches()

    # --- the loop ------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train to train.max_steps (resuming where a checkpoint left off), then the final hooks and the export."""
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
            save_tensors(self.parts.null_cond, self.out / "null_condition.safetensors")
        self.run_id = self.tracker.start(to_dict(self.cfg), run_id=self.run_id,
                                         tags={"world_size": str(self.dist.world_size)}) or self.run_id
        try:
            return self._loop()
        finally:
            self.stop.restore()

    def _loop(self) -> dict[str, Any]:
        train_cfg, last = self.cfg.train, self.cfg.train.max_steps
        global_batch = self.cfg.data.batch_size * train_cfg.grad_accum * self.dist.world_size
        bar = tqdm(total=last, initial=self.step, desc="ldm", disable=not self.dist.is_main, dynamic_ncols=True)
        self._stream = self._batches()
        window, losses, tick = [], {"first": None, "last": None}, time.time()
        while self.step < last:
            batch_losses = []
            for _ in range(train_cfg.grad_accum):
                batch = next(self._stream)
                self.skipped[batch.get("worker", 0)] = batch.get("skipped", 0)
                batch_losses.append(self.micro_step(batch))
            finite = [v for v in batch_losses if v is not None]
            window += finite
            self.step += 1
            self.samples_seen += global_batch
            if self.guard.end_step(len(finite) == len(batch_losses)):
                self._roll_back(f"non-finite loss in {self.guard.bad_in_a_row} consecutive steps")
                bar.reset(total=last)
                bar.update(self.step)
                continue
            self.ema.update(self.step)
            self.checkpointer.save_power_snapshot(self.ema, self.step, last)  # when due (train.power_ema)
            bar.update(1)
            if (self.step % train_cfg.log_every == 0 or self.step in (1, last)) and window:
                loss = self._log(window, time.time() - tick, global_batch)
                losses["first"] = loss if losses["first"] is None else losses["first"]
                losses["last"] = loss
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step == 1:
                    self._print(f"step 1: loss {loss:.4f}")
                window, tick = [], time.time()
            action = agreed_action(self.stop)  # "" | "requeue" (SIGUSR1) | "stop" (SIGTERM), the same on every rank
            if action:
                self.save_checkpoint()
                bar.close()
                self._print(f"{'pre-emption warning' if action == 'requeue' else 'stop'} signal: checkpointed {self.step}")
                requeued = run_requeue() if action == "requeue" and self.dist.is_main else None
                self.tracker.end("KILLED")
                return self._result(losses, preempted=True, exit_code=exit_code(action, requeued))
            if self.step % train_cfg.ckpt_every == 0 or self.step == last:
                self.save_checkpoint()
            self._interval_hooks(last)
        bar.close()
        last_loss = losses["last"]
        self._print(f"step {self.step}: loss {last_loss:.4f}" if last_loss is not None else "nothing to train")
        final = {**self._final_hooks(), "export": self._export()}
        self.tracker.end()
        return self._result(losses, preempted=False, **final)

    def _result(self, losses: dict, preempted: bool, exit_code: int = 0, **final) -> dict[str, Any]:
        return {"first_loss": losses["first"], "last_loss": losses["last"], "grid": None, "export": None, "val": None,
                "eval": None, **final, "run_id": self.tracker.run_id, "step": self.step, "preempted": preempted,
                "exit_code": exit_code}

    def _log(self, window: list[torch.Tensor], elapsed: float, global_batch: int) -> float:
        loss = float(mean_across_ranks(torch.stack(window).double().mean()))  # the window's losses reach the host here
        skipped = mean_across_ranks(float(sum(self.skipped.values()))) * self.dist.world_size  # all workers, ranks
        metrics = {"train/loss": loss, "train/lr": self.engine.get_lr()[0],
                   "train/samples_per_s": global_batch * len(window) / self.cfg.train.grad_accum / max(elapsed, 1e-9),
                   "train/skipped_samples": skipped, "train/nonfinite_steps": self.guard.nonfinite_steps,
                   "train/rollbacks": self.guard.rollbacks}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        self.tracker.log_metrics(metrics, self.step)
        return loss

    def _interval_hooks(self, last: int) -> None:
        """The hooks due at this step; when one fails, the steps since the last checkpoint are saved first."""
        train_cfg = self.cfg.train
        try:
            if hooks.due(self.step, train_cfg.val_every, last):
                self._held_out_loss()
            if hooks.due(self.step, train_cfg.sample_every, last):
                self._sample_grid()
            if self.evaluation is not None and hooks.due(self.step, self.cfg.eval.every, last):
                self._evaluate()
        except Exception:
            if self.step % train_cfg.ckpt_every:  # not saved at this step yet: keep the work before the error
                self.save_checkpoint()
            raise

    def _final_hooks(self) -> dict[str, Any]:
        """The last step's held-out loss, sample grid and evaluation (those the config has)."""
        final = {"val": self._held_out_loss() if self.held_out is not None else None, "grid": self._sample_grid()}
        final["eval"] = self._evaluate() if self.evaluation is not None else None
        return final

    def _held_out_loss(self) -> dict[str, float]:
        metrics = self.held_out(self.engine)  # every rank evaluates its share
        self.tracker.log_metrics(metrics, self.step)
        self._print(f"step {self.step}: val/loss {metrics['val/loss']:.4f}")
        return metrics

    def _sample_grid(self) -> str | None:
        ema = self.ema.full_state_dict()  # collective under ZeRO-3
        return on_main(lambda: self.grid(ema, self.step), f"the sample grid of step {self.step}")

    def _evaluate(self) -> dict[str, float] | None:
        ema = self.ema.full_state_dict()  # collective under ZeRO-3
        return on_main(lambda: self.evaluation(ema, self.step), f"the evaluation of step {self.step}")

    def _export(self) -> str | None:
        ema = self.ema.full_state_dict()  # collective under ZeRO-3
        raw = full_state(self.engine, self.cfg.train.zero_stage)
        info = {"step": self.step, "source": str(self.out), "run_id": self.tracker.run_id}
        return on_main(lambda: export_trained(self.parts, self.out, self.tracker, raw, ema, info), "the export")
