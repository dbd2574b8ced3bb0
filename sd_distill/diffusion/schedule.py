"""A noise schedule read from a diffusers scheduler config: alpha_t, sigma_t and DDIM timestep grids.

The grid follows diffusers' ``DDIMScheduler.set_timesteps`` (``leading`` / ``trailing`` / ``linspace`` spacing,
``steps_offset``) and its ``prev_timestep = t - num_train_timesteps // steps`` rule, so a sampler built on it and
the stock scheduler visit the same timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sd_distill.diffusion.math import alphas_sigmas

SPACINGS = ("leading", "trailing", "linspace")

# A latent-space DDIM sampler never clips or thresholds x_hat: latents are not in [-1, 1]. Set explicitly because
# ``DDIMScheduler.from_config`` on a config without these keys (Euler, DPM-Solver, LMS configs of community
# teachers) falls back to DDIM's own default ``clip_sample=True``; only ``StableDiffusionPipeline`` resets it.
LATENT_DDIM_OVERRIDES = {"clip_sample": False, "thresholding": False}


def latent_ddim_scheduler(config: dict, **overrides):
    """A diffusers ``DDIMScheduler`` from any scheduler's config (PNDM, Euler, DPM-Solver, LMS, DDIM, ...) with
    ``LATENT_DDIM_OVERRIDES`` and then ``overrides`` applied."""
    from diffusers import DDIMScheduler  # deferred: heavy (diffusers)

    return DDIMScheduler.from_config(dict(config), **{**LATENT_DDIM_OVERRIDES, **overrides})


@dataclass
class NoiseSchedule:
    alphas_cumprod: Tensor  # [num_train_timesteps], float32
    final_alpha_cumprod: float = 1.0  # alpha-bar used past the last step (DDIM "set_alpha_to_one")
    steps_offset: int = 0  # added to every leading-spaced timestep (SD configs: 1)
    timestep_spacing: str = "leading"  # how inference timesteps are spread over [0, num_train_timesteps)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseSchedule":
        """From any diffusers scheduler exposing ``alphas_cumprod`` and a config (DDIM, DDPM, DPM-Solver, ...)."""
        cfg = scheduler.config
        acp = scheduler.alphas_cumprod.detach().float().cpu()
        set_one = bool(cfg.get("set_alpha_to_one", False))
        spacing = cfg.get("timestep_spacing", "leading")
        if spacing not in SPACINGS:
            raise ValueError(f"scheduler timestep_spacing {spacing!r} not supported; valid: {list(SPACINGS)}")
        return cls(acp, 1.0 if set_one else float(acp[0]), int(cfg.get("steps_offset", 0) or 0), spacing)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor, steps_offset: int = 1) -> "NoiseSchedule":
        return cls(alphas_cumprod.detach().float().cpu(), float(alphas_cumprod[0]), steps_offset, "leading")

    def with_spacing(self, timestep_spacing: str) -> "NoiseSchedule":
        """The same noise levels with another inference grid (``trailing`` nests: the 2N grid refines the N grid)."""
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; valid: {list(SPACINGS)}")
        return NoiseSchedule(self.alphas_cumprod, self.final_alpha_cumprod, self.steps_offset, timestep_spacing)

    def timesteps(self, steps: int) -> Tensor:
        """The ``steps`` inference timesteps, descending (same values as ``DDIMScheduler.set_timesteps``)."""
        n = self.num_train_timesteps
        if not 1 <= steps <= n:
            raise ValueError(f"steps must be in [1, {n}], got {steps}")
        if self.timestep_spacing == "leading":
            ts = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        else:
            ts = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
        return torch.from_numpy(ts.copy())

    def prev_timestep(self, t: Tensor | int, steps: int) -> Tensor:
        """DDIM's previous timestep t - num_train_timesteps // steps (negative: past the end, use the final alpha)."""
        return torch.as_tensor(t).long() - self.num_train_timesteps // steps

    def alphas_sigmas(self, t: Tensor | int, ndim: int = 4, device=None) -> tuple[Tensor, Tensor]:
        """alpha_t, sigma_t shaped ``[B, 1, 1, 1]`` (negative t -> final_alpha_cumprod).

        A ``t`` on an accelerator is looked up in a copy of the table on that device, so the lookup never waits
        for ``t`` to reach the host (indexing and sqrt are exact: the values equal the CPU lookup's)."""
        t = torch.as_tensor(t)
        table = self.alphas_cumprod if t.device.type == "cpu" else self._table_on(t.device)
        a, s = alphas_sigmas(table, t, self.final_alpha_cumprod, ndim)
        return (a.to(device), s.to(device)) if device is not None else (a, s)

    def _table_on(self, device) -> Tensor:
        cache = self.__dict__.setdefault("_tables", {})
        if device not in cache:
            cache[device] = self.alphas_cumprod.to(device)
        return cache[device]
