"""The one module owning diffusion prediction conversions, the DDIM step and distillation targets.

Notation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", sec. 2):
the variance-preserving forward process is ``z_t = alpha_t x + sigma_t eps`` with ``alpha_t^2 + sigma_t^2 = 1``,
``alpha_t = sqrt(alphas_cumprod[t])``. Names in code map to symbols as

* ``x_t``   -> z_t  (the noisy latent at time t)
* ``x0``    -> x    (the clean sample; diffusers' ``pred_original_sample``, prediction type ``sample``)
* ``eps``   -> epsilon (the noise; prediction type ``epsilon``)
* ``v``     -> v = alpha_t eps - sigma_t x   (Salimans & Ho eq. in sec. 4; prediction type ``v_prediction``)
* ``alpha``, ``sigma`` -> alpha_t, sigma_t, shaped to broadcast against ``x_t`` (see :func:`alphas_sigmas`).

Every loss, target and sampler in this project converts through :func:`convert`; no other module writes the
epsilon/sample/v formulas.

Guidance convention. :func:`cfg_combine` uses the diffusers / LCM form
``pred = uncond + s (cond - uncond)`` with *s* the pipeline's ``guidance_scale`` (s = 1: no guidance).
Imagen / Meng et al. 2023 write ``(1 + w) cond - w uncond``; the two agree for ``w = s - 1``. A stock
``StableDiffusionPipeline`` whose UNet has ``time_cond_proj_dim`` set skips CFG and feeds
``guidance_embedding(guidance_scale - 1)`` as ``timestep_cond``: a w-conditioned student is therefore trained
with the embedding of ``w = imagen_w(s) = s - 1`` against the teacher's ``cfg_combine(.., s)``, and
``guidance_scale=7.5`` means the same thing for teacher and student. In code s is always ``guidance_scale`` and
Imagen's w always comes from :func:`imagen_w`; ``sigma`` / ``sigma_t`` are the noise levels.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SNR_SCHEMES = ("none", "snr", "truncated_snr", "min_snr_5")
LOSS_SPACES = ("x0", "epsilon", "v", "endpoint")

PredictionType = Literal["epsilon", "sample", "v_prediction"]


def check_prediction_type(prediction_type: str, where: str = "prediction_type") -> str:
    """Return ``prediction_type`` unchanged, or raise naming the valid ones."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown {where} {prediction_type!r}; valid: {list(PREDICTION_TYPES)}")
    return prediction_type


def alphas_sigmas(
    alphas_cumprod: Tensor, t: Tensor | int, final_alpha_cumprod: float | Tensor = 1.0, ndim: int = 4
) -> tuple[Tensor, Tensor]:
    """alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]), shaped ``[B, 1, ..., 1]``.

    ``t`` is an integer timestep or a LongTensor ``[B]``; a negative entry means "past the last step" and uses
    ``final_alpha_cumprod`` (diffusers DDIM: 1.0 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``).
    The result has ``ndim`` dimensions so it broadcasts against latents ``[B, C, H, W]``.
    """
    t = torch.as_tensor(t, device=alphas_cumprod.device).long().reshape(-1)
    final = torch.as_tensor(final_alpha_cumprod, dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    acp = torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], final)
    shape = (-1,) + (1,) * (ndim - 1)
    return acp.sqrt().reshape(shape), (1.0 - acp).clamp(min=0).sqrt().reshape(shape)


def to_x0(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """x = (z_t - sigma_t eps) / alpha_t  |  x  |  alpha_t z_t - sigma_t v   (for epsilon | sample | v_prediction)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return (x_t - sigma * pred) / alpha
    if prediction_type == "sample":
        return pred
    return alpha * x_t - sigma * pred


def to_eps(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """eps  |  (z_t - alpha_t x) / sigma_t  |  sigma_t z_t + alpha_t v   (for epsilon | sample | v_prediction)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "sample":
        return (x_t - alpha * pred) / sigma
    return sigma * x_t + alpha * pred


def to_v(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """v = alpha_t eps - sigma_t x, from either of the other two (a v prediction is returned as is)."""
    check_prediction_type(prediction_type)
    if prediction_type == "v_prediction":
        return pred
    x0 = to_x0(pred, x_t, alpha, sigma, prediction_type)
    eps = to_eps(pred, x_t, alpha, sigma, prediction_type)
    return alpha * eps - sigma * x0


_SPACE_TO_TYPE = {"x0": "sample", "sample": "sample", "epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction",
                  "v_prediction": "v_prediction"}


def convert(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, src_type: str, dst_type: str) -> Tensor:
    """Re-express a model output of ``src_type`` as ``dst_type`` at the same (z_t, alpha_t, sigma_t).

    Types are prediction types (``epsilon``, ``sample``, ``v_prediction``) or loss spaces (``x0``, ``v``).
    """
    src = _SPACE_TO_TYPE.get(src_type)
    dst = _SPACE_TO_TYPE.get(dst_type)
    if src is None or dst is None:
        bad = src_type if src is None else dst_type
        raise ValueError(f"unknown prediction type / space {bad!r}; valid: {sorted(_SPACE_TO_TYPE)}")
    if src == dst:
        return pred
    fn = {"sample": to_x0, "epsilon": to_eps, "v_prediction": to_v}[dst]
    return fn(pred, x_t, alpha, sigma, src)


def add_noise(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The forward process z_t = alpha_t x + sigma_t eps."""
    return alpha * x0 + sigma * eps


def ddim_step(x_t: Tensor, x0: Tensor, eps: Tensor, alpha_s: Tensor, sigma_s: Tensor) -> Tensor:
    """Deterministic DDIM (eta = 0; Song et al. 2021 eq. 12): z_s = alpha_s x_hat + sigma_s eps_hat.

    ``x0`` and ``eps`` are the model's estimates at (z_t, t) (see :func:`to_x0`, :func:`to_eps`); ``x_t`` is only
    checked for shape so a caller cannot pass estimates for a different batch.
    """
    if x0.shape != x_t.shape or eps.shape != x_t.shape:
        raise ValueError(f"ddim_step: x0 {tuple(x0.shape)} / eps {tuple(eps.shape)} do not match z_t {tuple(x_t.shape)}")
    return alpha_s * x0 + sigma_s * eps


def two_step_target(
    x_t: Tensor, x_t2: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_t2: Tensor, sigma_t2: Tensor
) -> Tensor:
    """The x0 target that takes z_t to the teacher's z_t'' in ONE DDIM step (Salimans & Ho 2022, Alg. 2).

    One DDIM step from t to t'' with estimate x~ gives z_t'' = alpha_t'' x~ + sigma_t'' (z_t - alpha_t x~) / sigma_t.
    Solving for x~:

        x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

    ``x_t2`` -> z_t'' is the teacher's latent after its (two, or more) DDIM steps; the same formula serves any
    number of teacher steps between t and t''. At t'' = 0 with sigma_t'' = 0 it reduces to z_t'' / alpha_t''.
    """
    return (x_t2 - (sigma_t2 / sigma_t) * x_t) / ddim_endpoint_scale(alpha_t, sigma_t, alpha_t2, sigma_t2)


def ddim_endpoint_scale(alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor) -> Tensor:
    """How far one DDIM step t -> s moves its endpoint per unit of x0 error, at fixed z_t.

    The step is z_s = alpha_s x_hat + (sigma_s / sigma_t)(z_t - alpha_t x_hat), so d z_s / d x_hat =
    alpha_s - (sigma_s / sigma_t) alpha_t. It is small at high noise (about 0.04 for the first of 8 trailing steps of
    SD's schedule) and close to alpha_s at the last step: the ``endpoint`` loss space weights x0 errors by its square,
    i.e. measures the error where the student's step lands, not in the model's output.
    """
    return alpha_s - (sigma_s / sigma_t) * alpha_t


def cfg_combine(cond: Tensor, uncond: Tensor, guidance_scale: Tensor | float) -> Tensor:
    """Classifier-free guidance, diffusers/LCM form: uncond + s (cond - uncond) with s = ``guidance_scale``
    (Ho & Salimans 2021, eq. 6 with Imagen's w = :func:`imagen_w` (s) = s - 1: (1 + w) cond - w uncond).
    ``guidance_scale`` is a float or a tensor broadcastable to ``cond``."""
    if isinstance(guidance_scale, Tensor) and guidance_scale.ndim == 1 and cond.ndim > 1:
        guidance_scale = guidance_scale.reshape((-1,) + (1,) * (cond.ndim - 1))
    return uncond + guidance_scale * (cond - uncond)


def imagen_w(guidance_scale: Tensor | float) -> Tensor | float:
    """Imagen's w for a diffusers guidance_scale s: w = s - 1 (what the stock pipeline embeds)."""
    return guidance_scale - 1


def guidance_embedding(w: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of the guidance strength (VDM / LCM; same values as diffusers'
    ``StableDiffusionPipeline.get_guidance_scale_embedding``): with h = dim // 2 and f_k = 10000^(-k / (h - 1)),
    emb = [sin(1000 w f_k), cos(1000 w f_k)], zero-padded to ``dim`` when odd. ``w`` is ``[B]`` -> ``[B, dim]``.
    Pass Imagen's w (``imagen_w(guidance_scale)``), as the stock pipeline does."""
    w = torch.as_tensor(w).reshape(-1).to(dtype) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2."""
    return alpha**2 / sigma.clamp(min=1e-12) ** 2


def snr_weight(
    alpha: Tensor,
    sigma: Tensor,
    scheme: Literal["none", "snr", "truncated_snr", "min_snr_5"],
    loss_space: Literal["x0", "epsilon", "v", "endpoint"] = "x0",
) -> Tensor:
    """Per-sample weight that multiplies an MSE measured in ``loss_space``.

    The schemes are defined as weights lambda(t) on the x-space error ||x - x_hat||^2:
      * ``none``: plain MSE in ``loss_space`` (weight 1 whatever the space);
      * ``snr``: lambda = SNR (Salimans & Ho 2022 eq. 9: the standard epsilon loss written in x-space);
      * ``truncated_snr``: lambda = max(SNR, 1) (Salimans & Ho 2022 sec. 4, "truncated SNR weighting");
      * ``min_snr_5``: lambda = min(SNR, 5) (Hang et al. 2023, "Min-SNR weighting", gamma = 5).
    Errors in the other spaces are rescaled x-space errors at fixed z_t: ||eps - eps_hat||^2 = SNR ||x - x_hat||^2 and
    ||v - v_hat||^2 = (SNR + 1) ||x - x_hat||^2 (alpha^2 + sigma^2 = 1), so the returned weight is
    lambda / 1, lambda / SNR or lambda / (SNR + 1) for ``x0``, ``epsilon``, ``v``.
    """
    if scheme not in SNR_SCHEMES:
        raise ValueError(f"unknown snr weighting {scheme!r}; valid: {list(SNR_SCHEMES)}")
    if loss_space not in LOSS_SPACES:
        raise ValueError(f"unknown loss space {loss_space!r}; valid: {list(LOSS_SPACES)}")
    if scheme == "none":
        return torch.ones_like(alpha)
    if loss_space == "endpoint":
        raise ValueError(f"snr weighting {scheme!r} is defined for the x0 / epsilon / v loss spaces; the endpoint space "
                         "carries its own per-step weight: use snr_weighting 'none'")
    s = snr(alpha, sigma)
    lam = {"snr": s, "truncated_snr": s.clamp(min=1.0), "min_snr_5": s.clamp(max=5.0)}[scheme]
    space_factor = {"x0": torch.ones_like(s), "epsilon": s, "v": s + 1.0}[loss_space]
    return lam / space_factor
