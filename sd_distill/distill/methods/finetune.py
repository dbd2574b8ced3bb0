"""Fine-tuning the teacher on the curated set before step distillation (``method.finetune_steps``).

A step-distillation loss only pulls the student towards its teacher, so a student distilled from SD 1.5 can be
faster than SD 1.5 but not better. The curated set is better than what the teacher learned from (filtered by a
preference model, recaptioned); for a student to gain from it, something must learn the set itself. With
``finetune_steps`` > 0 the method's plan starts with this phase: a copy of the teacher's UNet trained on SD's own
objective on the curated latents, after which the distillation phases take the fine-tuned UNet as their teacher
(and make their student from it), so the student learns the fine-tuned model's trajectories.

Per batch (symbols as in :mod:`sd_distill.diffusion.math`):
 1. t ~ U{0, ..., T-1} (every training timestep, as SD trains), eps ~ N(0, I), z_t = alpha_t x + sigma_t eps.
 2. Caption dropout: with probability ``data_uncond_fraction`` per row the text is the negative prompt's
    embedding instead of the caption's (SD 1.5 trained with 10%), so the unconditional prediction that CFG
    extrapolates from learns the curated set too.
 3. loss = || S_p(x_hat) - S_p(x) ||^2, the student's output in its own prediction space p (epsilon, sample or v)
    against the target SD trains on (:func:`~sd_distill.distill.methods.common.data_loss`), unweighted over t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sd_distill.diffusion.math import add_noise, to_x0
from sd_distill.diffusion.sampling import guided_prediction
from sd_distill.distill.methods.common import data_loss, random_timesteps, randn, uniform, unpack_batch
from sd_distill.distill.methods.config import MethodConfig, PhaseSpec, training_schedule


class CuratedFinetune:
    """SD's denoising objective with caption dropout on the curated latents: the teacher, fine-tuned."""

    w_conditioned = False

    def __init__(self, cfg, phase, teacher, teacher_unet, student_unet):
        self.cfg, self.phase = cfg, phase
        self.student, self.teacher_unet = student_unet, teacher_unet
        self.schedule = training_schedule(cfg, teacher.schedule)
        self.prediction_type = teacher.prediction_type
        self.student_steps = phase.student_steps

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x0, cond, uncond = unpack_batch(batch)
        n, device, dtype = x0.shape[0], x0.device, x0.dtype
        t = random_timesteps(n, self.schedule.num_train_timesteps, generator, device)
        alpha_t, sigma_t = (v.to(dtype) for v in self.schedule.alphas_sigmas(t, device=device))
        z_t = add_noise(x0, randn(x0.shape, generator, device, dtype), alpha_t, sigma_t)
        dropped = uniform(n, 0.0, 1.0, generator, device) < self.cfg.data_uncond_fraction
        text = torch.where(dropped.view(-1, 1, 1), uncond, cond)  # [B, L, D] hidden states, or TextCond row-wise
        x_hat = to_x0(guided_prediction(self.student, z_t, t, text, None, 1.0, "cond"), z_t, alpha_t, sigma_t,
                      self.prediction_type)
        loss = data_loss(x_hat, x0, z_t, alpha_t, sigma_t, self.prediction_type)
        logs = {"loss": loss.detach(), "loss_data": loss.detach(), "t_mean": t.float().mean(),
                "uncond_fraction": dropped.float().mean()}
        return loss, logs


def finetune_phases(cfg: MethodConfig, first_steps: int) -> list[PhaseSpec]:
    """``[the fine-tune phase]`` when ``cfg.finetune_steps`` > 0, else ``[]``. ``first_steps``: the step count the
    first distillation phase samples its teacher at (the fine-tuned UNet is that teacher)."""
    if not cfg.finetune_steps:
        return []
    return [PhaseSpec(index=0, name=f"finetune-{cfg.finetune_steps}", teacher_steps=first_steps,
                      student_steps=first_steps, kind="finetune", max_steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                      batch_size=cfg.finetune_batch_size)]


# the method settings the fine-tune phase reads (its place in the plan, its own length, lr, batch, caption dropout)
FINETUNE_READS = ("kind", "teacher_steps", "student_steps", "progressive_start_steps", "finetune_steps", "finetune_lr",
                  "finetune_batch_size", "data_uncond_fraction", "timestep_spacing")


def finetune_method(cfg: MethodConfig) -> MethodConfig:
    """``cfg`` with every setting the fine-tune phase does not read at its default, so students that differ only in
    what follows the fine-tune (architecture, KD, distillation losses) share one fine-tune stage."""
    return MethodConfig(**{k: getattr(cfg, k) for k in FINETUNE_READS})
