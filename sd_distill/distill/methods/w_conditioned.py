"""Two-stage guided distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", sec. 3).

Stage 1 (``w_stage1``): a w-conditioned student x_eta(z_t, t, w) is trained to match the teacher's CFG output in a
single forward pass (Meng et al. eq. 6): for t on the stage's DDIM grid (``progressive_start_steps`` steps, see
below), s ~ U[guidance_min, guidance_max],
    L = || S(x_eta(z_t, w = s - 1)) - S(cfg_combine(x_c, x_u, s)) ||^2,
with s the diffusers guidance scale (``guidance_scale`` in code), w = ``imagen_w(s)`` Imagen's guidance strength,
S the loss space and the SNR weight of :func:`snr_weight`.

Why the grid and not t ~ U{0..T-1} (Meng et al. sample continuous t): the stage-1 model is only ever evaluated on
that grid -- the first halving's teacher takes its two DDIM steps on it -- and with uniform t the loss is spent
elsewhere. For an x0-parameterised (``sample``) teacher that is fatal: the CFG correction is large in x0 at *every*
t, and an error of the network's output costs (SNR_t + 1) in the default v loss space, so t near 0 (SNR ~ 1e3)
outweighs t = T-1 (SNR ~ 5e-3) by ~1000x and the high-noise steps that decide a few-step sampler stay untrained
(measured on the tiny test teacher: relative x0 error vs the CFG target at t = 999 only 0.42 -> 0.22 after 100
steps, while t = 10 went 0.25 -> 0.04). epsilon / v teachers hardly notice (their x0 outputs at small t are ~z_t).
The guidance enters through diffusers' ``time_cond_proj_dim`` / ``timestep_cond`` as
``guidance_embedding(imagen_w(s))`` (w = s - 1) -- exactly what a stock
``StableDiffusionPipeline`` feeds for ``guidance_scale = s``, so the saved student needs no custom pipeline.

Both stages optionally add ``data_loss_weight * L_data``: SD's denoising objective on the curated latent x that z_t
was noised from, for the student's unguided output (w = 0), in its prediction space
(:func:`~sd_distill.distill.methods.common.data_loss`).

Stage 2 (``w_halving``): progressive distillation of the w-conditioned model (Meng et al. sec. 3.2, Salimans & Ho
Alg. 2): the teacher (the previous phase's w-conditioned student) takes two DDIM steps with the same w, the
student one, onto the two-step target. Each halving is its own phase.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sd_distill.diffusion.math import add_noise, to_x0, two_step_target
from sd_distill.diffusion.sampling import guided_prediction
from sd_distill.distill.methods.config import MethodConfig, PhaseSpec, chain_phases, halving_phases, training_schedule
from sd_distill.distill.methods.finetune import finetune_phases
from sd_distill.distill.methods.common import (data_loss, randn, regression_loss, student_intervals,
                                               teacher_endpoint, uniform, unpack_batch)


def _require_w(unet, who: str) -> None:
    if unet.config.time_cond_proj_dim is None:
        raise ValueError(f"w-conditioned distillation: the {who} UNet has no guidance input (time_cond_proj_dim is "
                         "None); build the student with make_student(cfg, teacher_unet, phase)")


def _with_data_term(method, loss: Tensor, logs: dict, x0, z_t, t, cond, alpha, sigma) -> Tensor:
    """loss + data_loss_weight * L_data, with the student's unguided estimate (w = 0: guidance_scale 1) on the
    noised curated latent (one more student forward; :func:`~sd_distill.distill.methods.common.data_loss`)."""
    weight = method.cfg.data_loss_weight
    if weight <= 0:
        return loss
    x_hat = to_x0(guided_prediction(method.student, z_t, t, cond, None, 1.0, "wcond"), z_t, alpha, sigma,
                  method.prediction_type)
    l_data = data_loss(x_hat, x0, z_t, alpha, sigma, method.prediction_type)
    logs["loss_distill"] = loss.detach()
    logs["loss_data"] = l_data.detach()
    return loss + weight * l_data


class WConditionedStage1:
    """Stage 1: match the teacher's CFG output with one w-conditioned evaluation."""

    w_conditioned = True

    def __init__(self, cfg, phase, teacher, teacher_unet, student_unet):
        _require_w(student_unet, "student")
        self.cfg, self.phase = cfg, phase
        self.student, self.teacher_unet = student_unet, teacher_unet
        self.schedule = training_schedule(cfg, teacher.schedule)
        self.prediction_type = teacher.prediction_type
        self.student_steps = phase.student_steps
        self.teacher_mode = "wcond" if teacher_unet.config.time_cond_proj_dim is not None else "cfg"

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x0, cond, uncond = unpack_batch(batch)
        n, device, dtype = x0.shape[0], x0.device, x0.dtype
        t, t_end = student_intervals(self.schedule, self.student_steps, n, generator, device)
        alpha_t, sigma_t = (v.to(dtype) for v in self.schedule.alphas_sigmas(t, device=device))
        end = tuple(v.to(dtype) for v in self.schedule.alphas_sigmas(t_end, device=device))
        z_t = add_noise(x0, randn(x0.shape, generator, device, dtype), alpha_t, sigma_t)
        guidance_scale = uniform(n, self.cfg.guidance_min, self.cfg.guidance_max, generator, device)
        with torch.no_grad():
            target = to_x0(guided_prediction(self.teacher_unet, z_t, t, cond, uncond, guidance_scale, self.teacher_mode),
                           z_t, alpha_t, sigma_t, self.prediction_type)
        pred = to_x0(guided_prediction(self.student, z_t, t, cond, None, guidance_scale, "wcond"), z_t, alpha_t, sigma_t,
                     self.prediction_type)
        loss = regression_loss(pred, target, z_t, alpha_t, sigma_t, self.cfg.loss_space, self.cfg.snr_weighting,
                               end=end)
        logs = {"guidance_mean": guidance_scale.mean()}
        loss = _with_data_term(self, loss, logs, x0, z_t, t, cond, alpha_t, sigma_t)
        return loss, {"loss": loss.detach(), **logs}


class WConditionedHalving:
    """Stage 2: one progressive halving of a w-conditioned model, same w for teacher and student."""

    w_conditioned = True

    def __init__(self, cfg, phase, teacher, teacher_unet, student_unet):
        _require_w(teacher_unet, "teacher")
        _require_w(student_unet, "student")
        if phase.teacher_steps != 2 * phase.student_steps:
            raise ValueError(f"w-conditioned halving {phase.name}: teacher_steps ({phase.teacher_steps}) must be "
                             f"twice student_steps ({phase.student_steps})")
        self.cfg, self.phase = cfg, phase
        self.student, self.teacher_unet = student_unet, teacher_unet
        self.schedule = training_schedule(cfg, teacher.schedule)
        self.prediction_type = teacher.prediction_type
        self.student_steps = phase.student_steps

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x0, cond, _ = unpack_batch(batch)
        n, device, dtype = x0.shape[0], x0.device, x0.dtype
        t, t_end = student_intervals(self.schedule, self.student_steps, n, generator, device)
        alpha_t, sigma_t = (v.to(dtype) for v in self.schedule.alphas_sigmas(t, device=device))
        alpha_e, sigma_e = (v.to(dtype) for v in self.schedule.alphas_sigmas(t_end, device=device))
        z_t = add_noise(x0, randn(x0.shape, generator, device, dtype), alpha_t, sigma_t)
        guidance_scale = uniform(n, self.cfg.guidance_min, self.cfg.guidance_max, generator, device)
        z_e = teacher_endpoint(self.teacher_unet, self.schedule, z_t, t, t_end, 2, cond, None, guidance_scale, "wcond",
                               self.prediction_type)
        target = two_step_target(z_t, z_e, alpha_t, sigma_t, alpha_e, sigma_e)
        pred = to_x0(guided_prediction(self.student, z_t, t, cond, None, guidance_scale, "wcond"), z_t, alpha_t,
                     sigma_t, self.prediction_type)
        loss = regression_loss(pred, target, z_t, alpha_t, sigma_t, self.cfg.loss_space, self.cfg.snr_weighting,
                               end=(alpha_e, sigma_e))
        logs = {"t_mean": t.float().mean(), "guidance_mean": guidance_scale.mean()}
        loss = _with_data_term(self, loss, logs, x0, z_t, t, cond, alpha_t, sigma_t)
        return loss, {"loss": loss.detach(), **logs}


def plan(cfg: MethodConfig) -> list[PhaseSpec]:
    """Stage 1 (match the CFG output at progressive_start_steps with a w-conditioned student), then halvings
    progressive_start_steps -> ... -> student_steps."""
    stage1 = PhaseSpec(index=0, name=f"w-stage1-{cfg.progressive_start_steps}", teacher_steps=cfg.progressive_start_steps,
                       student_steps=cfg.progressive_start_steps, kind="w_stage1", w_conditioned=True)
    return chain_phases(finetune_phases(cfg, cfg.progressive_start_steps),
                        [stage1, *halving_phases(cfg, "w_halving", w_conditioned=True, first_index=1)])
