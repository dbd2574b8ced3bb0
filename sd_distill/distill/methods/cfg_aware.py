"""One-stage CFG-aware direct step distillation (the reference method): teacher at 16/32 steps -> student at 8.

References: Li et al. 2023, "SnapFusion", sec. 4.2 (CFG-aware step distillation: the student runs with CFG and
is regressed onto the teacher's CFG trajectory; its loss is mixed with the vanilla step-distillation loss), and
Salimans & Ho 2022, Alg. 2 (the student's one DDIM step must land where the teacher's steps land).

Per batch (symbols as in :mod:`sd_distill.diffusion.math`):
 1. t from the student's N-step DDIM grid, t_end the next grid point; eps ~ N(0, I); z_t = alpha_t x + sigma_t eps
    (or, for a ``trajectory_fraction`` of the batch, the state at t of the teacher's own guided sampler from noise:
    :func:`~sd_distill.distill.methods.common.teacher_trajectory_states`).
 2. s ~ U[guidance_min, guidance_max] per sample (diffusers form, see ``cfg_combine``).
 3. Teacher, no grad, k = teacher_steps / student_steps DDIM steps t -> t_end:
    with CFG at s -> z''_cfg, and conditional only -> z''_van; both trajectories share one batched forward per
    sub-step (:func:`~sd_distill.distill.methods.common.teacher_cfg_and_cond_endpoints`).
 4. Targets x~ = two_step_target(z_t, z'', ...) for both (the x0 that reaches z'' in one DDIM step).
 5. Student, one batched forward of (uncond, cond): x_hat_cfg = cfg_combine(x_hat_c, x_hat_u, s), x_hat_van = x_hat_c.
 6. loss = cfg_loss_weight * L(x_hat_cfg, x~_cfg) + vanilla_loss_weight * L(x_hat_van, x~_van)
           + data_loss_weight * L_data(x_hat_van, x),
    with L the MSE in ``loss_space`` weighted by ``snr_weighting`` (``endpoint``: the distance between where the
    student's step and the teacher's steps land at t_end), and L_data the denoising term on the curated latent x
    itself, SD's objective in the student's prediction space (:func:`~sd_distill.distill.methods.common.data_loss`;
    only on the rows whose z_t was noised from x, not on trajectory states). As SD trains with caption dropout,
    a ``data_uncond_fraction`` p of those rows regress the unconditional output x_hat_u instead of x_hat_c:
    L_data(m * x_hat_u + (1 - m) * x_hat_c, x) with m ~ Bernoulli(p) per row, so the prediction CFG
    extrapolates from (x_hat_u) learns the curated set too, not only the conditional one. The three terms together
    are the reference's one-stage "multi-loss"; data_loss_weight defaults to 0.
The student keeps the teacher's prediction type: every output is converted to x0 at the boundary, so epsilon,
sample and v_prediction teachers are handled by the same code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sd_distill.diffusion.math import add_noise, cfg_combine, to_x0, two_step_target
from sd_distill.diffusion.sampling import guided_prediction
from sd_distill.distill.methods.bksdm import kd_phases
from sd_distill.distill.methods.config import MethodConfig, PhaseSpec, chain_phases, training_schedule
from sd_distill.distill.methods.finetune import finetune_phases
from sd_distill.distill.methods.common import (data_loss, randn, regression_loss, student_intervals,
                                               teacher_cfg_and_cond_endpoints, teacher_endpoint, teacher_trajectory_states,
                                               uniform, unpack_batch)


class CfgAwareDistillation:
    """SnapFusion-style CFG-aware + vanilla step distillation from ``teacher_steps`` to ``student_steps``."""

    w_conditioned = False

    def __init__(self, cfg, phase, teacher, teacher_unet, student_unet):
        if phase.teacher_steps % phase.student_steps or phase.teacher_steps <= phase.student_steps:
            raise ValueError(f"phase {phase.name}: teacher_steps {phase.teacher_steps} must be a multiple > 1 of "
                             f"student_steps {phase.student_steps}")
        self.cfg, self.phase = cfg, phase
        self.student, self.teacher_unet = student_unet, teacher_unet
        self.schedule = training_schedule(cfg, teacher.schedule)
        self.prediction_type = teacher.prediction_type
        self.student_steps = phase.student_steps
        self.k = phase.teacher_steps // phase.student_steps

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x0, cond, uncond = unpack_batch(batch)
        n, device, dtype = x0.shape[0], x0.device, x0.dtype
        cfg = self.cfg
        # 1-2. interval, noise, guidance
        t, t_end = student_intervals(self.schedule, self.student_steps, n, generator, device)
        alpha_t, sigma_t = (v.to(dtype) for v in self.schedule.alphas_sigmas(t, device=device))
        alpha_e, sigma_e = (v.to(dtype) for v in self.schedule.alphas_sigmas(t_end, device=device))
        z_t = add_noise(x0, randn(x0.shape, generator, device, dtype), alpha_t, sigma_t)
        guidance_scale = uniform(n, cfg.guidance_min, cfg.guidance_max, generator, device)
        on_path = torch.zeros(n, dtype=torch.bool, device=device)
        if cfg.trajectory_fraction > 0:  # some states from the teacher's own guided sampler instead
            on_path = uniform(n, 0.0, 1.0, generator, device) < cfg.trajectory_fraction
            if on_path.any():
                rows = on_path.nonzero().squeeze(1)
                noise = randn(x0[rows].shape, generator, device, dtype)
                z_t[rows] = teacher_trajectory_states(self.teacher_unet, self.schedule, self.student_steps, self.k,
                                                      t[rows], noise, cond[rows], uncond[rows], guidance_scale[rows],
                                                      self.prediction_type)
        # 3-4. teacher endpoints and one-step targets
        use_cfg, use_van = cfg.cfg_loss_weight > 0, cfg.vanilla_loss_weight > 0
        ends = {}
        if use_cfg and use_van:  # both trajectories in one teacher forward per sub-step
            ends["cfg"], ends["vanilla"] = teacher_cfg_and_cond_endpoints(
                self.teacher_unet, self.schedule, z_t, t, t_end, self.k, cond, uncond, guidance_scale,
                self.prediction_type)
        elif use_cfg:
            ends["cfg"] = teacher_endpoint(self.teacher_unet, self.schedule, z_t, t, t_end, self.k, cond, uncond,
                                           guidance_scale, "cfg", self.prediction_type)
        elif use_van:
            ends["vanilla"] = teacher_endpoint(self.teacher_unet, self.schedule, z_t, t, t_end, self.k, cond, None, 1.0,
                                               "cond", self.prediction_type)
        targets = {key: two_step_target(z_t, z_e, alpha_t, sigma_t, alpha_e, sigma_e) for key, z_e in ends.items()}
        # 5. student: cond (and uncond) in one forward
        if use_cfg:
            out = self.student(torch.cat([z_t, z_t]), torch.cat([t, t]),
                               encoder_hidden_states=torch.cat([uncond, cond])).sample
            out_u, out_c = out.chunk(2)
            x_u = to_x0(out_u, z_t, alpha_t, sigma_t, self.prediction_type)
            x_c = to_x0(out_c, z_t, alpha_t, sigma_t, self.prediction_type)
        else:
            x_c = to_x0(guided_prediction(self.student, z_t, t, cond, None, 1.0, "cond"), z_t, alpha_t, sigma_t,
                        self.prediction_type)
        # 6. mixed loss
        logs = {"t_mean": t.float().mean(), "guidance_mean": guidance_scale.mean()}  # device tensors: no host read
        total = x0.new_zeros((), dtype=torch.float32)
        if use_cfg:
            l_cfg = regression_loss(cfg_combine(x_c, x_u, guidance_scale), targets["cfg"], z_t, alpha_t, sigma_t,
                                    cfg.loss_space, cfg.snr_weighting, end=(alpha_e, sigma_e))
            total = total + cfg.cfg_loss_weight * l_cfg
            logs["loss_cfg"] = l_cfg.detach()
        if use_van:
            l_van = regression_loss(x_c, targets["vanilla"], z_t, alpha_t, sigma_t, cfg.loss_space, cfg.snr_weighting,
                                    end=(alpha_e, sigma_e))
            total = total + cfg.vanilla_loss_weight * l_van
            logs["loss_vanilla"] = l_van.detach()
        if cfg.data_loss_weight > 0:  # SD's own objective on the rows that are noised curated latents
            x_data = x_c
            if cfg.data_uncond_fraction > 0:  # caption dropout: some rows train the unconditional output
                dropped = uniform(n, 0.0, 1.0, generator, device) < cfg.data_uncond_fraction
                if not use_cfg:  # no unconditional forward yet
                    x_u = to_x0(guided_prediction(self.student, z_t, t, uncond, None, 1.0, "cond"), z_t, alpha_t,
                                sigma_t, self.prediction_type)
                x_data = torch.where(dropped.view(-1, *([1] * (x_c.dim() - 1))), x_u, x_c)
            l_data = data_loss(x_data, x0, z_t, alpha_t, sigma_t, self.prediction_type, rows=~on_path)
            total = total + cfg.data_loss_weight * l_data
            logs["loss_data"] = l_data.detach()
        logs["loss"] = total.detach()
        return total, logs


def plan(cfg: MethodConfig) -> list[PhaseSpec]:
    """One phase, teacher_steps -> student_steps; first the fine-tune phase when ``finetune_steps`` > 0, then the
    BK-SDM KD phase when ``kd_steps`` > 0."""
    step = PhaseSpec(index=0, name=f"cfg-aware-{cfg.teacher_steps}-{cfg.student_steps}", teacher_steps=cfg.teacher_steps,
                     student_steps=cfg.student_steps, kind="cfg_aware")
    return chain_phases(finetune_phases(cfg, cfg.teacher_steps), kd_phases(cfg, cfg.teacher_steps), [step])
