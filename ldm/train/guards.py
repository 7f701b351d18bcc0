"""Numerical guardrails: a micro-batch with a non-finite loss is skipped on every rank and counted; ``max_bad_steps``
such steps in a row roll back to the last checkpoint, at most ``max_rollbacks`` times, then the run stops with a
clear error. Checkpoints are never written from non-finite weights (the trainer checks before saving)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class TrainingDiverged(RuntimeError):
    """Non-finite losses or weights persisted and no rollback is left."""


@dataclass
class NonFiniteGuard:
    max_bad_steps: int
    max_rollbacks: int
    nonfinite_steps: int = 0  # steps with at least one skipped micro-batch
    bad_in_a_row: int = 0
    rollbacks: int = 0

    def end_step(self, all_finite: bool) -> bool:
        """Record a step; True when it is time to roll back (``max_bad_steps`` bad steps in a row)."""
        if all_finite:
            self.bad_in_a_row = 0
            return False
        self.nonfinite_steps += 1
        self.bad_in_a_row += 1
        return self.bad_in_a_row >= self.max_bad_steps

    def rollback_or_raise(self, reason: str, step: int, latest: str | None) -> str:
        """The checkpoint tag to roll back to (counting the rollback), or TrainingDiverged when none is left."""
        if latest is None or self.rollbacks >= self.max_rollbacks:
            raise TrainingDiverged(f"{reason} at step {step}; "
                                   + ("no checkpoint to roll back to" if latest is None
                                      else f"already rolled back {self.rollbacks} times (train.max_rollbacks)"))
        self.rollbacks += 1
        self.bad_in_a_row = 0
        return latest


def skip_micro_batch(engine, denoiser, z: torch.Tensor, cond: dict) -> None:
    """Step the engine with exactly zero gradients, keeping DeepSpeed's accumulation bookkeeping in step.

    A zero loss through a finite input (zeros at t = 0) gives exactly zero gradients, unlike the bad loss itself,
    whose backward would carry its non-finite values into every gradient.
    """
    t0 = torch.zeros(z.shape[0], device=z.device)
    loss = denoiser(torch.zeros_like(z), t0, cond).sum() * 0.0
    engine.backward(loss)
    engine.step()
