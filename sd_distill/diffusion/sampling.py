"""Guided UNet evaluation and a deterministic DDIM sampler on top of :mod:`sd_distill.diffusion.math`.

``guided_prediction`` is the one place a UNet is called with guidance, in one of three modes:

* ``"cfg"``   two evaluations (one batched forward), combined with ``cfg_combine(cond, uncond, s)``;
* ``"cond"``  the conditional output only (no guidance, s = 1);
* ``"wcond"`` one conditional evaluation with ``timestep_cond = guidance_embedding(imagen_w(s))`` (a w-conditioned
  UNet, Meng et al. 2023; w = s - 1 is what a stock ``StableDiffusionPipeline`` embeds, see :mod:`math`).

``cfg_and_cond_predictions`` evaluates a CFG state and a conditional-only state in one forward (the CFG-aware
teacher's two trajectories).

s is the diffusers ``guidance_scale`` throughout.

Precision: the UNet runs in whatever dtype it has (bf16 / fp16 weights, or autocast); its output is upcast to
fp32 before anything else touches it, so the CFG combination, the guidance scale and the DDIM update that follow
are fp32 whatever the UNet's dtype (a bf16-rounded s = 7.3 is 7.3125; bf16-rounded alpha_t / sigma_t bias every
teacher sub-step the same way).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from sd_distill.diffusion.math import (cfg_combine, check_prediction_type, ddim_step, guidance_embedding, imagen_w, to_eps,
                                       to_x0)
from sd_distill.diffusion.schedule import NoiseSchedule

GuidanceMode = Literal["cfg", "cond", "wcond"]
GUIDANCE_MODES = ("cfg", "cond", "wcond")


def _batch(x: Tensor, n: int) -> Tensor:
    return x.expand(n, *x.shape[1:]) if x.shape[0] == 1 and n > 1 else x


def _unet_dtype(unet) -> torch.dtype | None:
    """The dtype of the UNet's weights (its inputs are cast to it, so a bf16 / fp16 UNet runs without autocast)."""
    param = next(iter(unet.parameters()), None) if hasattr(unet, "parameters") else None
    return None if param is None else param.dtype


def _per_sample(value: Tensor | float, n: int, device) -> Tensor:
    v = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    return v.expand(n) if v.numel() == 1 else v


def guided_prediction(
    unet, z: Tensor, t: Tensor, cond: Tensor, uncond: Tensor | None, guidance_scale: Tensor | float,
    mode: GuidanceMode,
) -> Tensor:
    """The UNet output (in its own prediction type) at (z_t, t) under ``mode``, in fp32; ``guidance_scale`` is s, per
    sample or scalar, and is combined in fp32.

    ``cond`` / ``uncond`` are text embeddings ``[B or 1, L, D]``; ``t`` is ``[B]`` or a scalar. ``z`` and the text
    are cast to the UNet's weight dtype for the forward pass only.
    """
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"unknown guidance mode {mode!r}; valid: {list(GUIDANCE_MODES)}")
    n = z.shape[0]
    t = torch.as_tensor(t, device=z.device).long().reshape(-1).expand(n) if torch.as_tensor(t).numel() == 1 \
        else torch.as_tensor(t, device=z.device).long()
    dtype = _unet_dtype(unet) or z.dtype
    z_in, cond = z.to(dtype), _batch(cond, n).to(dtype)
    if mode == "cond":
        return unet(z_in, t, encoder_hidden_states=cond).sample.float()
    guidance_scale = _per_sample(guidance_scale, n, z.device)
    if mode == "wcond":
        dim = unet.config.time_cond_proj_dim
        if dim is None:
            raise ValueError("guidance mode 'wcond' needs a w-conditioned UNet (unet.config.time_cond_proj_dim is None)")
        emb = guidance_embedding(imagen_w(guidance_scale), dim).to(device=z.device, dtype=dtype)
        return unet(z_in, t, encoder_hidden_states=cond, timestep_cond=emb).sample.float()
    if uncond is None:
        raise ValueError("guidance mode 'cfg' needs negative (unconditional) embeddings")
    text = torch.cat([_batch(uncond, n).to(dtype), cond])
    out = unet(torch.cat([z_in, z_in]), torch.cat([t, t]), encoder_hidden_states=text).sample.float()
    out_u, out_c = out.chunk(2)
    return cfg_combine(out_c, out_u, guidance_scale)


def cfg_and_cond_predictions(
    unet, z_cfg: Tensor, z_cond: Tensor | None, t: Tensor, cond: Tensor, uncond: Tensor, guidance_scale: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """(CFG prediction at ``z_cfg``, conditional prediction at ``z_cond``) from ONE batched forward, both fp32.

    The rows are [uncond @ z_cfg; cond @ z_cfg; cond @ z_cond] (3B); with ``z_cond`` None the conditional state is
    ``z_cfg`` itself, whose conditional row the CFG forward already holds, so the forward is [uncond; cond] (2B)
    and the second result is that row. The values are ``guided_prediction``'s "cfg" and "cond" outputs for the same
    inputs (up to the round-off of a different batch composition)."""
    n = z_cfg.shape[0]
    t = torch.as_tensor(t, device=z_cfg.device).long().reshape(-1).expand(n) if torch.as_tensor(t).numel() == 1 \
        else torch.as_tensor(t, device=z_cfg.device).long()
    dtype = _unet_dtype(unet) or z_cfg.dtype
    cond, uncond = _batch(cond, n).to(dtype), _batch(uncond, n).to(dtype)
    states, times, texts = [z_cfg.to(dtype), z_cfg.to(dtype)], [t, t], [uncond, cond]
    if z_cond is not None:
        states, times, texts = states + [z_cond.to(dtype)], times + [t], texts + [cond]
    out = unet(torch.cat(states), torch.cat(times), encoder_hidden_states=torch.cat(texts)).sample.float()
    parts = out.chunk(len(states))
    out_u, out_c = parts[0], parts[1]
    return cfg_combine(out_c, out_u, _per_sample(guidance_scale, n, z_cfg.device)), parts[-1]


def _schedule(scheduler_or_alphas) -> NoiseSchedule:
    if isinstance(scheduler_or_alphas, NoiseSchedule):
        return scheduler_or_alphas
    if isinstance(scheduler_or_alphas, Tensor):
        return NoiseSchedule.from_alphas_cumprod(scheduler_or_alphas)
    return NoiseSchedule.from_scheduler(scheduler_or_alphas)


@torch.no_grad()
def ddim_sample(
    unet,
    scheduler_or_alphas,
    latents: Tensor,
    prompt_embeds: Tensor,
    negative_embeds: Tensor | None,
    steps: int,
    guidance_scale: float | Tensor,
    prediction_type: str,
    w_conditioned: bool = False,
) -> Tensor:
    """Deterministic DDIM (eta = 0) from ``latents`` (z_T, unit-variance noise) over ``steps`` timesteps.

    Each step (Song et al. 2021 eq. 12): 1. evaluate the UNet under guidance (CFG when ``guidance_scale`` > 1 and not
    ``w_conditioned``; the guidance embedding when ``w_conditioned``); 2. convert its output to x_hat and eps_hat;
    3. z_prev = alpha_prev x_hat + sigma_prev eps_hat. Timesteps and the final alpha follow the scheduler's config,
    so the result matches a stock ``DDIMScheduler`` loop. Steps 2-3 run in fp32 whatever the UNet's dtype; the
    result is fp32. ``guidance_scale`` > 1 without ``negative_embeds`` (and not w-conditioned) is an error: CFG needs
    the unconditional branch, and sampling without it would silently be unguided.
    """
    check_prediction_type(prediction_type)
    schedule = _schedule(scheduler_or_alphas)
    guided = bool(torch.as_tensor(guidance_scale).gt(1.0).any())
    if guided and not w_conditioned and negative_embeds is None:
        raise ValueError(f"ddim_sample: guidance_scale {guidance_scale} > 1 needs negative_embeds for classifier-free "
                         "guidance (pass the encoded negative prompt), or guidance_scale=1.0 for unguided sampling")
    mode: GuidanceMode = "wcond" if w_conditioned else ("cfg" if guided else "cond")
    z = latents.float()
    for t in schedule.timesteps(steps).tolist():
        alpha, sigma = schedule.alphas_sigmas(t, device=z.device)
        alpha_p, sigma_p = schedule.alphas_sigmas(schedule.prev_timestep(t, steps), device=z.device)
        pred = guided_prediction(unet, z, torch.tensor([t]), prompt_embeds, negative_embeds, guidance_scale, mode)
        x0 = to_x0(pred, z, alpha, sigma, prediction_type)
        eps = to_eps(pred, z, alpha, sigma, prediction_type)
        z = ddim_step(z, x0, eps, alpha_p, sigma_p)
    return z
