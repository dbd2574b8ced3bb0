"""Stop training on non-finite or exploding losses, with an error that says where the last good state is.

A step is *bad* when its loss (or gradient norm) is NaN/inf, or when its loss exceeds
``explode_factor`` times the running mean of the good losses seen so far (after ``warmup`` good steps).
A bad step's update is skipped (the trainer zeroes the gradients); more than ``patience``
consecutive bad steps raise ``TrainingDivergedError``. Checkpoints are only written after good
steps, so the newest checkpoint on disk is always a good one. :func:`skip_update` closes a rejected step for
fp16's gradient scaler.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional


class TrainingDivergedError(RuntimeError):
    """Raised when the loss stays non-finite or explodes; carries the last good checkpoint folder."""

    def __init__(self, message: str, last_checkpoint: Optional[Path]):
        super().__init__(message)
        self.last_checkpoint = last_checkpoint


class NanGuard:
    def __init__(self, patience: int = 0, explode_factor: Optional[float] = 100.0, warmup: int = 10, momentum: float = 0.9):
        self.patience = patience
        self.explode_factor = explode_factor
        self.warmup = warmup
        self.momentum = momentum
        self.running_mean: Optional[float] = None
        self.good_steps = 0
        self.bad_in_a_row = 0

    def reason_step_is_bad(self, loss: float, grad_norm: Optional[float] = None) -> Optional[str]:
        """Why this step is bad, or None when it is good (pure: does not change the guard)."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        if (
            self.explode_factor is not None
            and self.running_mean is not None
            and self.good_steps >= self.warmup
            and loss > self.explode_factor * self.running_mean
        ):
            return f"loss {loss:.4g} exceeds {self.explode_factor:g} x running mean {self.running_mean:.4g}"
        return None

    def check(self, step: int, loss: float, grad_norm: Optional[float], last_checkpoint: Optional[Path]) -> bool:
        """Record one step; True when the update may be applied. Raises after too many bad steps."""
        reason = self.reason_step_is_bad(loss, grad_norm)
        if reason is None:
            self.bad_in_a_row = 0
            self.good_steps += 1
            m = self.momentum
            self.running_mean = loss if self.running_mean is None else m * self.running_mean + (1 - m) * loss
            return True
        self.bad_in_a_row += 1
        if self.bad_in_a_row > self.patience:
            where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
            raise TrainingDivergedError(
                f"training diverged at step {step}: {reason} ({self.bad_in_a_row} bad step(s) in a row, "
                f"trainer.nan_patience={self.patience}); {where}. Lower trainer.lr, enable trainer.max_grad_norm "
                f"or use mixed_precision='bf16' instead of 'fp16'.",
                last_checkpoint,
            )
        return False

    def state_dict(self) -> dict:
        return {"running_mean": self.running_mean, "good_steps": self.good_steps, "bad_in_a_row": self.bad_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.running_mean = state["running_mean"]
        self.good_steps = int(state["good_steps"])
        self.bad_in_a_row = int(state["bad_in_a_row"])


def skip_update(grad_scaler) -> None:
    """Close a step whose update the guard rejected, for an fp16 ``GradScaler`` (no-op without one).

    The optimizer step is what normally calls ``scaler.update()``; a skipped step leaves the ``unscale_`` that
    gradient clipping recorded, and the next step's ``unscale_`` raises "unscale_() has already been called".
    ``update()`` consumes the record: it lowers the scale when the gradients held inf / NaN (the usual cause of a
    rejected fp16 step) and resets the per-step state. Precondition: this step's gradients were unscaled (the
    trainer always clips before the guard decides).
    """
    if grad_scaler is not None and grad_scaler.is_enabled():
        grad_scaler.update()
