"""Pieces shared by the step-distillation methods: timestep / guidance-scale / noise sampling, the teacher's multi-step
DDIM endpoint, and the weighted regression loss. Everything converts through :mod:`sd_distill.diffusion.math`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from sd_distill.diffusion.math import convert, ddim_endpoint_scale, ddim_step, snr_weight, to_eps, to_x0
from sd_distill.diffusion.sampling import GuidanceMode, cfg_and_cond_predictions, guided_prediction
from sd_distill.diffusion.schedule import NoiseSchedule
from sd_distill.distill.textcond import TextCond


@runtime_checkable
class DistillMethod(Protocol):
    """What the trainer drives: a trainable ``student`` and a loss on one batch.

    ``batch``: "latents" [B,4,h,w] (already * vae scaling_factor), "prompt_embeds" [B,L,D],
    "negative_embeds" [B,L,D] (or [1,L,D]). Returns (scalar loss with grad, logs): the logs are detached 0-d
    tensors (or floats), read by the trainer only when it records a step, so a step needs no host read.
    """

    student: torch.nn.Module

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]: ...


def randn(shape, generator: torch.Generator, device, dtype=torch.float32) -> Tensor:
    """Standard normal noise drawn on the generator's device (CPU generators work with GPU models)."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device, dtype)


def uniform(n: int, low: float, high: float, generator: torch.Generator, device) -> Tensor:
    """n draws from U[low, high]."""
    u = torch.rand(n, generator=generator, device=generator.device).to(device)
    return low + (high - low) * u


def random_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator, device) -> Tensor:
    """n integer timesteps uniform in [0, num_train_timesteps)."""
    return torch.randint(0, num_train_timesteps, (n,), generator=generator, device=generator.device).to(device)


def student_intervals(schedule: NoiseSchedule, student_steps: int, n: int, generator: torch.Generator, device):
    """(t, t_end) per sample: a random timestep of the student's own DDIM grid and the next one on that grid.

    Training on the grid the student samples with makes its N-step sampler see exactly the trained intervals.
    ``t_end`` < 0 means the last step (to the final alpha).
    """
    grid = schedule.timesteps(student_steps).to(generator.device)  # drawn and looked up where the generator is
    idx = torch.randint(0, len(grid), (n,), generator=generator, device=generator.device)
    t = grid[idx]
    return t.to(device), schedule.prev_timestep(t, student_steps).to(device)


SDXL_BATCH_KEYS = ("pooled_prompt_embeds", "negative_pooled_embeds", "time_ids")


def unpack_batch(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | TextCond, Tensor | TextCond]:
    """(x0, cond, uncond) with uncond broadcast to the batch; names the missing key otherwise.

    SD 1.x / 2.x batches give hidden-state tensors. A batch with SDXL's added conditioning (``SDXL_BATCH_KEYS``)
    gives ``TextCond`` values: cond = (prompt_embeds, pooled_prompt_embeds, time_ids), uncond = (negative_embeds,
    negative_pooled_embeds, the same time_ids), as ``StableDiffusionXLPipeline`` pairs them.
    """
    for key in ("latents", "prompt_embeds", "negative_embeds"):
        if key not in batch:
            raise KeyError(f"distillation batch is missing {key!r}; it needs latents, prompt_embeds, negative_embeds")
    x0, cond, uncond = batch["latents"], batch["prompt_embeds"], batch["negative_embeds"]
    n = x0.shape[0]
    if uncond.shape[0] == 1 and n > 1:
        uncond = uncond.expand(n, *uncond.shape[1:])
    present = [k for k in SDXL_BATCH_KEYS if k in batch]
    if present:
        if len(present) != len(SDXL_BATCH_KEYS):
            raise KeyError(f"SDXL distillation batch has {present} but not "
                           f"{[k for k in SDXL_BATCH_KEYS if k not in batch]}; it needs all of {list(SDXL_BATCH_KEYS)}")
        neg_pooled, time_ids = batch["negative_pooled_embeds"], batch["time_ids"]
        if neg_pooled.shape[0] == 1 and n > 1:
            neg_pooled = neg_pooled.expand(n, *neg_pooled.shape[1:])
        if time_ids.shape[0] == 1 and n > 1:
            time_ids = time_ids.expand(n, *time_ids.shape[1:])
        cond = TextCond(cond, batch["pooled_prompt_embeds"], time_ids)
        uncond = TextCond(uncond, neg_pooled, time_ids)
    return x0, cond.to(x0.dtype), uncond.to(x0.dtype)


def _next_time(t: Tensor, t_end: Tensor, j: int, k: int) -> Tensor:
    """t_j = t - round(j (t - t_end) / k), t_k = t_end; negative (past the last step) is -1."""
    t_next = t_end if j == k else t - torch.round(j * (t - t_end).float() / k).long()
    return torch.where(t_next < 0, torch.full_like(t_next, -1), t_next)


def _ddim_substep(pred: Tensor, z: Tensor, t_cur: Tensor, t_next: Tensor, active: Tensor, schedule: NoiseSchedule,
                  prediction_type: str) -> Tensor:
    """One DDIM update z_t -> z_t_next from the teacher's prediction; rows not ``active`` stay where they are.

    fp32 whatever the UNet's dtype: ``pred`` is already upcast and alpha_t, sigma_t and z_t enter the conversion in
    fp32 (a bf16 teacher must not see a bf16-rounded schedule)."""
    alpha, sigma = schedule.alphas_sigmas(t_cur, device=z.device)
    x0, eps = to_x0(pred, z, alpha, sigma, prediction_type), to_eps(pred, z, alpha, sigma, prediction_type)
    a_n, s_n = schedule.alphas_sigmas(t_next, device=z.device)
    return torch.where(active.reshape(-1, 1, 1, 1), ddim_step(z, x0, eps, a_n, s_n), z)


@torch.no_grad()
def teacher_endpoint(unet, schedule: NoiseSchedule, z_t: Tensor, t: Tensor, t_end: Tensor, k: int, cond: Tensor,
                     uncond: Tensor | None, guidance_scale, mode: GuidanceMode, prediction_type: str) -> Tensor:
    """z at t_end after ``k`` teacher DDIM steps from z_t (Salimans & Ho 2022, Alg. 2, the inner teacher loop).

    Intermediate times are t_j = t - round(j (t - t_end) / k). A negative time is "past the last step"
    (final alpha); once a sample gets there it stays (its remaining sub-steps are skipped). The sub-steps' DDIM
    updates run in fp32 (the result is fp32) whatever the UNet's dtype.
    """
    z, t_cur = z_t.float(), t.clone()
    for j in range(1, k + 1):
        t_next = _next_time(t, t_end, j, k)
        pred = guided_prediction(unet, z, t_cur.clamp(min=0), cond, uncond, guidance_scale, mode)
        z = _ddim_substep(pred, z, t_cur, t_next, t_cur >= 0, schedule, prediction_type)
        t_cur = torch.where(t_cur >= 0, t_next, t_cur)
    return z


@torch.no_grad()
def teacher_cfg_and_cond_endpoints(unet, schedule: NoiseSchedule, z_t: Tensor, t: Tensor, t_end: Tensor, k: int,
                                   cond, uncond, guidance_scale, prediction_type: str) -> tuple[Tensor, Tensor]:
    """``teacher_endpoint`` in mode "cfg" (at s) and in mode "cond" from the same (z_t, t), one teacher forward per
    sub-step for both (:func:`~sd_distill.diffusion.sampling.cfg_and_cond_predictions`).

    1. Sub-step 1: both trajectories stand at (z_t, t): one forward of [uncond; cond] (2B rows) gives the CFG
       prediction and, as its conditional half, the conditional one.
    2. Sub-steps 2..k: one forward of [uncond @ z_cfg; cond @ z_cfg; cond @ z_cond] (3B rows).
    3. Each trajectory takes ``teacher_endpoint``'s fp32 DDIM update.
    Teacher rows (3k - 1) B in k forwards, against 3k B in 2k forwards for two ``teacher_endpoint`` calls; the
    results equal those calls' up to batching round-off.
    """
    z_cfg, z_cond, t_cur = z_t.float(), None, t.clone()
    for j in range(1, k + 1):
        t_next, active = _next_time(t, t_end, j, k), t_cur >= 0
        pred_cfg, pred_cond = cfg_and_cond_predictions(unet, z_cfg, z_cond, t_cur.clamp(min=0), cond, uncond,
                                                       guidance_scale)
        z_cond = _ddim_substep(pred_cond, z_cfg if z_cond is None else z_cond, t_cur, t_next, active, schedule,
                               prediction_type)
        z_cfg = _ddim_substep(pred_cfg, z_cfg, t_cur, t_next, active, schedule, prediction_type)
        t_cur = torch.where(active, t_next, t_cur)
    return z_cfg, z_cond


@torch.no_grad()
def teacher_trajectory_states(unet, schedule: NoiseSchedule, student_steps: int, k: int, t: Tensor, noise: Tensor,
                              cond, uncond, guidance_scale: Tensor, prediction_type: str) -> Tensor:
    """z_t taken from the teacher's own guided sampler instead of the forward process.

    Each sample starts from unit noise at the first time of the student's N-step grid and follows the teacher's
    k*N-step DDIM sampler (k teacher steps per student interval, CFG at the sample's own guidance) until it reaches
    its ``t`` (a point of that grid). These are the states the distilled student meets when it samples: a guided
    ODE trajectory, whose noise is correlated with its content, is not ``alpha x + sigma eps`` for an independent
    eps, and on the toy teacher the one-vs-two-step gap is several times smaller on it than on noised data.
    """
    grid = schedule.timesteps(student_steps).to(t.device)
    on_grid = grid[None, :] == t[:, None]
    if not bool(on_grid.any(1).all()):
        raise ValueError(f"teacher_trajectory_states: times {t.tolist()} are not all on the {student_steps}-step grid")
    position = on_grid.float().argmax(1)  # index of each t on the grid
    z = noise.float().clone()
    for j in range(int(position.max())):
        rows = (position > j).nonzero().squeeze(1)
        t_j, t_next = grid[j].expand(len(rows)), grid[j + 1].expand(len(rows))
        z[rows] = teacher_endpoint(unet, schedule, z[rows], t_j, t_next, k, cond[rows],
                                   uncond[rows], guidance_scale[rows], "cfg", prediction_type)
    return z


def regression_loss(x0_pred: Tensor, x0_target: Tensor, z_t: Tensor, alpha: Tensor, sigma: Tensor,
                    loss_space: str, snr_weighting: str, end: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """mean_b w_b * mean((S(x_hat) - S(x~))^2) with S the loss space (x0 / epsilon / v at the same z_t) and
    w the SNR weight (:func:`sd_distill.diffusion.math.snr_weight`).

    ``endpoint``: S(x) is where one DDIM step from (z_t, t) with estimate x lands at the step's end, whose
    (alpha, sigma) are ``end`` (the student's next grid point); the constant part cancels, leaving
    ``ddim_endpoint_scale * x``.
    """
    alpha, sigma = alpha.to(x0_pred.dtype), sigma.to(x0_pred.dtype)
    if loss_space == "endpoint":
        if end is None:
            raise ValueError("loss_space 'endpoint' needs the step's end (alpha, sigma); this method passed none")
        scale = ddim_endpoint_scale(alpha, sigma, end[0].to(x0_pred.dtype), end[1].to(x0_pred.dtype))
        pred, target = scale * x0_pred, scale * x0_target.to(x0_pred.dtype)
    else:
        pred = convert(x0_pred, z_t, alpha, sigma, "sample", loss_space)
        target = convert(x0_target.to(x0_pred.dtype), z_t, alpha, sigma, "sample", loss_space)
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    weight = snr_weight(alpha.float(), sigma.float(), snr_weighting, loss_space).reshape(-1)
    return (weight * per_sample).mean()


# The model's own prediction space per prediction type (SD's training objective is the MSE there).
PREDICTION_LOSS_SPACE = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}


def data_loss(x0_pred: Tensor, x0: Tensor, z_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str,
              rows: Tensor | None = None) -> Tensor:
    """The denoising term on the curated image's own latent: SD's training objective (BK-SDM's task loss),
    L_data = mean_b || S_p(x_hat) - S_p(x) ||^2 in the student's prediction space p, where z_t = alpha_t x +
    sigma_t eps was noised from the clean latent x and S_p maps an x0 estimate at z_t to p (epsilon: eps_hat vs
    eps; sample: x_hat vs x; v: v_hat vs v = alpha_t eps - sigma_t x). Unweighted over t, as SD trains.

    ``rows`` (a bool mask or indices) restricts it to the samples whose z_t really is a noised curated latent
    (not the trajectory states of ``teacher_trajectory_states``, which have no clean x). No such row: 0.
    """
    if rows is not None:
        if rows.dtype == torch.bool:
            rows = rows.nonzero().squeeze(1)
        if rows.numel() == 0:
            return x0_pred.new_zeros((), dtype=torch.float32)
        x0_pred, x0, z_t, alpha, sigma = (v[rows] for v in (x0_pred, x0, z_t, alpha, sigma))
    return regression_loss(x0_pred, x0, z_t, alpha, sigma, PREDICTION_LOSS_SPACE[prediction_type], "none")


def check_compatible(teacher_unet, student_unet, text_dim: int | None = None) -> None:
    """Raise a clear error when the student cannot stand in for the teacher (latent / text interfaces differ)."""
    for key in ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
                "projection_class_embeddings_input_dim"):
        tv, sv = teacher_unet.config.get(key), student_unet.config.get(key)
        if tv != sv:
            raise ValueError(f"teacher/student architecture mismatch: unet.config.{key} is {tv} for the teacher but "
                             f"{sv} for the student; they must be equal")
    if text_dim is not None and teacher_unet.config.cross_attention_dim != text_dim:
        raise ValueError(f"teacher unet cross_attention_dim {teacher_unet.config.cross_attention_dim} does not match "
                         f"the text encoder's hidden size {text_dim}")
