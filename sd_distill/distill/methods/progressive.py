"""Progressive distillation without guidance conditioning (Salimans & Ho 2022, Alg. 2), one halving per phase.

Each phase trains a student to take ONE DDIM step where its teacher takes two (teacher_steps = 2 student_steps);
the next phase's teacher is this phase's student. Without a guidance input the student cannot be told the guidance
strength, so guidance stays outside the network: teacher and student are both run with CFG at the same sampled
s ~ U[guidance_min, guidance_max] (the CFG-aware target of SnapFusion, sec. 4.2), mixed with the unguided
(vanilla) target. The student is sampled with ordinary CFG (a stock pipeline at the same guidance_scale).
The loss of one halving is therefore :class:`CfgAwareDistillation` with k = 2.
"""

from __future__ import annotations

from sd_distill.distill.methods.cfg_aware import CfgAwareDistillation
from sd_distill.distill.methods.bksdm import kd_phases
from sd_distill.distill.methods.config import MethodConfig, PhaseSpec, chain_phases, halving_phases
from sd_distill.distill.methods.finetune import finetune_phases


class ProgressiveDistillation(CfgAwareDistillation):
    """One halving of a progressive chain (teacher at 2N steps -> student at N)."""

    def __init__(self, cfg, phase, teacher, teacher_unet, student_unet):
        if phase.teacher_steps != 2 * phase.student_steps:
            raise ValueError(f"progressive phase {phase.name}: teacher_steps ({phase.teacher_steps}) must be twice "
                             f"student_steps ({phase.student_steps})")
        if teacher_unet.config.time_cond_proj_dim is not None:
            raise ValueError("progressive distillation has no guidance input, but the teacher UNet is w-conditioned "
                             "(time_cond_proj_dim set); use kind='w_conditioned' for it")
        super().__init__(cfg, phase, teacher, teacher_unet, student_unet)


def plan(cfg: MethodConfig) -> list[PhaseSpec]:
    """Halvings only: progressive_start_steps -> ... -> student_steps; first the fine-tune phase when
    ``finetune_steps`` > 0, then the BK-SDM KD phase when ``kd_steps`` > 0."""
    start = cfg.progressive_start_steps
    return chain_phases(finetune_phases(cfg, start), kd_phases(cfg, start), halving_phases(cfg, "progressive"))
