"""Stop training on non-finite or exploding losses, with an error that says where the last good state is.

A step is *bad* when its loss (or gradient norm) is NaN/inf, or when its loss exceeds
``explode_factor`` times the running mean of the good losses seen so far (after ``warmup`` good steps).
A bad step's update is skipped (the trainer zeroes the gradients); more than ``patience``
consecutive bad steps raise ``TrainingDivergedError``. Checkpoints are only written after good
steps, so the newest checkpoint on disk is always a good one. :func:`skip_update` closes a rejected step for
fp16's gradient scaler.

:class:`DeviceNanGuard` is the same rule evaluated on the accelerator without reading anything back: the step's
verdict stays a device tensor that the fused AdamW reads as ``found_inf`` (a bad step's update is skipped inside
the kernel, as fp16's gradient scaler skips one), and the host reads the guard every few steps
(``trainer.nan_check_every``), raising the same error, for the same step, as the eager guard would.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch


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
            raise self.diverged(step, reason, self.bad_in_a_row, last_checkpoint)
        return False

    def diverged(self, step: int, reason: str, bad_in_a_row: int, last_checkpoint: Optional[Path]) -> TrainingDivergedError:
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        return TrainingDivergedError(
            f"training diverged at step {step}: {reason} ({bad_in_a_row} bad step(s) in a row, "
            f"trainer.nan_patience={self.patience}); {where}. Lower trainer.lr, enable trainer.max_grad_norm "
            f"or use mixed_precision='bf16' instead of 'fp16'.",
            last_checkpoint,
        )

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


# reason codes of DeviceNanGuard (0 = good); the text is the eager guard's
_LOSS_NOT_FINITE, _GRAD_NOT_FINITE, _EXPLODED = 1, 2, 3


class DeviceNanGuard:
    """:class:`NanGuard`'s rule on device tensors: ``step()`` syncs nothing, ``read()`` syncs once.

    State (running mean of good losses, good steps, bad steps in a row) lives in float64 / int64 scalars on the
    device, updated with ``torch.where`` exactly as ``NanGuard.check`` updates its floats. The first step at which
    more than ``patience`` bad steps ran in a row is recorded with its reason; from then on every step is skipped,
    so the weights stay those of the last good step until ``read()`` raises.
    """

    def __init__(self, guard: NanGuard, device):
        self.guard = guard
        f64 = dict(dtype=torch.float64, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.running_mean = torch.tensor(math.nan if guard.running_mean is None else guard.running_mean, **f64)
        self.good_steps = torch.tensor(guard.good_steps, **i64)
        self.bad_in_a_row = torch.tensor(guard.bad_in_a_row, **i64)
        self.diverged_at = torch.zeros((), **i64)  # 0 = not diverged; else the 1-based step
        self.reason = torch.zeros((), **i64)
        self.bad_value = torch.zeros((), **f64)  # the loss / gradient norm that made that step bad
        self.mean_then = torch.zeros((), **f64)

    def step(self, step: int, loss: torch.Tensor, grad_norm: Optional[torch.Tensor]) -> torch.Tensor:
        """Record step ``step`` (1-based); returns a bool device scalar: True = skip this step's update."""
        g = self.guard
        loss = loss.detach().reshape(()).to(torch.float32).to(torch.float64)  # the value .item() would give
        loss_ok = torch.isfinite(loss)
        grad_ok = torch.ones_like(loss_ok) if grad_norm is None else torch.isfinite(grad_norm.detach().reshape(()))
        explode = torch.zeros_like(loss_ok)
        if g.explode_factor is not None:
            explode = (~torch.isnan(self.running_mean)) & (self.good_steps >= g.warmup) & \
                (loss > g.explode_factor * self.running_mean)
        reason = torch.where(~loss_ok, _LOSS_NOT_FINITE, torch.where(~grad_ok, _GRAD_NOT_FINITE,
                                                                    torch.where(explode, _EXPLODED, 0)))
        bad = reason > 0
        was_diverged = self.diverged_at > 0
        good = ~bad & ~was_diverged
        m = g.momentum
        mean_next = torch.where(torch.isnan(self.running_mean), loss, m * self.running_mean + (1 - m) * loss)
        bad_value = torch.where(reason == _GRAD_NOT_FINITE,
                                loss if grad_norm is None else grad_norm.detach().reshape(()).to(torch.float64), loss)
        newly = bad & ~was_diverged & (self.bad_in_a_row + 1 > g.patience)
        self.diverged_at = torch.where(newly, step, self.diverged_at)
        self.reason = torch.where(newly, reason, self.reason)
        self.bad_value = torch.where(newly, bad_value, self.bad_value)
        self.mean_then = torch.where(newly, self.running_mean, self.mean_then)
        self.running_mean = torch.where(good, mean_next, self.running_mean)
        self.good_steps = self.good_steps + good.long()
        self.bad_in_a_row = torch.where(was_diverged, self.bad_in_a_row,
                                        torch.where(bad, self.bad_in_a_row + 1, torch.zeros_like(self.bad_in_a_row)))
        return bad | was_diverged | newly

    def read(self, last_checkpoint: Optional[Path]) -> None:
        """Copy the state into the host guard (one sync); raise ``TrainingDivergedError`` as the eager guard would."""
        g = self.guard
        values = torch.stack([self.running_mean, self.good_steps.double(), self.bad_in_a_row.double(),
                              self.diverged_at.double(), self.reason.double(), self.bad_value, self.mean_then]).tolist()
        mean, good_steps, bad_in_a_row, diverged_at, reason, value, mean_then = values
        g.running_mean = None if math.isnan(mean) else mean
        g.good_steps, g.bad_in_a_row = int(good_steps), int(bad_in_a_row)
        if diverged_at:
            text = {_LOSS_NOT_FINITE: f"loss is {value}", _GRAD_NOT_FINITE: f"gradient norm is {value}",
                    _EXPLODED: f"loss {value:.4g} exceeds {g.explode_factor:g} x running mean {mean_then:.4g}"}
            raise g.diverged(int(diverged_at), text[int(reason)], g.patience + 1, last_checkpoint)
