"""The one optimizer step every toy trainer takes, and its progress line."""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch

from sd_distill.progress import ProgressFn, report


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, losses: list[float], *,
                   sched=None, clip: Optional[Iterable[torch.nn.Parameter]] = None, max_norm: float = 1.0) -> None:
    """zero_grad -> backward -> (clip) -> step -> (schedule); the loss is appended to ``losses``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, max_norm)
    opt.step()
    if sched is not None:
        sched.step()
    losses.append(loss.item())


def log_progress(progress: Optional[ProgressFn], step: int, total: int, label: str, losses: list[float],
                 every: int = 50, digits: int = 3) -> None:
    """Report the mean of the last ``every`` losses every ``every`` steps and at the last step."""
    if step % every == 0 or step == total - 1:
        report(progress, step + 1, total, f"{label} loss {np.mean(losses[-every:]):.{digits}f}")
