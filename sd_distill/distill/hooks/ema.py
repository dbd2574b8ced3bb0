"""Exponential moving average of trainable weights.

After every optimizer step ``shadow <- d * shadow + (1 - d) * param`` with
``d = min(decay, (1 + n) / (10 + n))`` (n = number of updates so far): the warm-up keeps the
average from being dominated by the random-ish early weights (the schedule used by
diffusers' ``EMAModel`` with ``use_ema_warmup=False`` and by TensorFlow's ExponentialMovingAverage
with ``num_updates``). Shadow weights are kept in float32 whatever the training precision.
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be in (0, 1) or None (EMA off), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self._count: torch.Tensor | None = None  # the update count on the device while updates are lazy
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skip: torch.Tensor | None = None) -> None:
        """One EMA step. ``skip``: a bool device scalar (the lazy NaN guard's verdict): when True the shadow and
        the update count stay as they are, decided on the device without reading ``skip`` back."""
        if skip is None:
            d = self.current_decay()
            for name, p in model.named_parameters():
                if name in self.shadow:
                    self.shadow[name].lerp_(p.detach().float(), 1.0 - d)
            self.num_updates += 1
            return
        if self._count is None:
            self._count = torch.tensor(float(self.num_updates), dtype=torch.float64, device=skip.device)
        n, keep = self._count, (~skip).to(torch.float64)
        weight = ((1.0 - torch.clamp((1 + n) / (10 + n), max=self.decay)) * keep).float()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), weight)
        self._count = n + keep

    def sync(self) -> None:
        """Fold the device-side update count of ``update(..., skip=...)`` into ``num_updates`` (one read)."""
        if self._count is not None:
            self.num_updates = int(self._count.item())
            self._count = None

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into ``model`` (used at export)."""
        self.sync()
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict:
        self.sync()
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA checkpoint lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        self.decay = float(state["decay"])
        self._count = None
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name] = value.float().clone()
