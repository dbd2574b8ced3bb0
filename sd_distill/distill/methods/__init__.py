"""Distillation methods, one file per method, chosen by ``MethodConfig.kind`` through ``registry.METHODS``.

Interface (what the distill stage calls):

    plan_phases(cfg) -> list[PhaseSpec]                              # registry.py: the method's phases, in order
    make_student(cfg, teacher_unet, phase) -> UNet2DConditionModel   # students.py: trainable, from teacher_unet
    build_method(cfg, phase, teacher, teacher_unet, student_unet) -> DistillMethod
    DistillMethod.student; DistillMethod.loss(batch, generator) -> (loss, logs)
    sample_student(method, latents, prompt_embeds, negative_embeds, guidance_scale) -> latents

Every phase class (see ``registry.py`` for how a method plugs in) also exposes

* ``schedule``: the NoiseSchedule whose DDIM grid it trains on, the teacher's noise levels with
  ``MethodConfig.timestep_spacing`` (default "trailing"; ``training_schedule(cfg, teacher.schedule)``); the export
  writes that spacing into the student's scheduler config;
* ``student_steps``: the steps to sample the student with;
* ``w_conditioned``: sample it with ``ddim_sample(..., w_conditioned=True)`` / a stock pipeline without CFG;
* ``prediction_type``: the student's, always the teacher's.

``sample_student`` samples the current student the way it is meant to be used: CFG for cfg_aware / progressive /
bksdm_kd, the guidance embedding for w_conditioned.

Contracts between phases and methods:

* a phase's ``teacher_unet`` after the first phase is the previous phase's student (eval, requires_grad False),
  loaded from that phase's output folder; ``make_student`` copies it (blocks are removed in phase 0 only);
* a teacher whose UNet is w-conditioned is sampled with mode "wcond"; ``w_halving`` phases check it;
* ``bksdm_kd`` phases have teacher_steps == student_steps (the student samples with as many steps as the
  teacher), and ``MethodConfig`` rejects ``kind="bksdm_kd"`` with ``student_arch="same"``; ``bk-base`` keeps the
  mid block (BK-SDM's model card: base = fewer blocks in the outer stages, small = base without the mid block,
  tiny = small without the innermost down / outermost up stage); ``BkSdmDistillation.close()`` removes its
  feature hooks (call it when the phase ends);
* SDXL teachers: batches also hold "pooled_prompt_embeds", "negative_pooled_embeds", "time_ids"; ``unpack_batch``
  turns the text side into ``TextCond`` values and ``build_method`` lets both UNets take them
  (:mod:`sd_distill.distill.textcond`); ``sample_student`` accepts TextCond prompt / negative inputs likewise;
* loss logs always contain "loss"; cfg_aware / progressive add "loss_cfg", "loss_vanilla", "t_mean",
  "guidance_mean"; bksdm_kd adds "loss_task", "loss_kd_out", "loss_kd_feat".
"""

from __future__ import annotations

from sd_distill.diffusion.sampling import ddim_sample
from sd_distill.distill.methods.common import DistillMethod, check_compatible
from sd_distill.distill.methods.config import METHOD_KINDS, MethodConfig, PhaseSpec
from sd_distill.distill.methods.finetune import finetune_method
from sd_distill.distill.methods.registry import METHODS, phase_class, plan_phases
from sd_distill.distill.methods.students import make_student, with_w_conditioning
from sd_distill.distill.textcond import accept_text_cond, is_sdxl_unet

__all__ = ["DistillMethod", "MethodConfig", "PhaseSpec", "plan_phases", "make_student", "build_method",
           "sample_student", "with_w_conditioning", "phase_params", "METHOD_KINDS", "METHODS"]


def phase_params(params, phase: PhaseSpec):
    """The distill parameters ``phase`` is trained (and keyed in the store) with: for the fine-tune phase only the
    method settings it reads (``finetune_method``), so students of one teacher that share a fine-tune recipe share
    its stage; every other phase, ``params`` unchanged."""
    if phase.kind != "finetune":
        return params
    return params.model_copy(update={"method": finetune_method(params.method)})


def build_method(cfg: MethodConfig, phase: PhaseSpec, teacher, teacher_unet, student_unet) -> DistillMethod:
    """The loss object of one phase. ``teacher`` supplies the schedule and prediction type, ``teacher_unet`` is the
    phase's teacher (the original, or the previous phase's student), ``student_unet`` the model being trained."""
    if getattr(teacher, "text_encoder", None) is None:
        text_dim = None
    elif hasattr(teacher, "text_dim"):
        text_dim = teacher.text_dim
    else:
        text_dim = getattr(getattr(teacher.text_encoder, "config", None), "hidden_size", None)
    check_compatible(teacher_unet, student_unet, text_dim)
    if is_sdxl_unet(teacher_unet):  # SDXL: the text side arrives as a TextCond (see distill/textcond.py)
        for unet in (teacher_unet, student_unet):
            accept_text_cond(unet)
    return phase_class(phase.kind)(cfg, phase, teacher, teacher_unet, student_unet)


def sample_student(method, latents, prompt_embeds, negative_embeds, guidance_scale: float):
    """Sample ``method.student`` with its own step count, DDIM grid and guidance mode (DDIM, deterministic).

    For an SDXL student ``prompt_embeds`` / ``negative_embeds`` are ``TextCond`` values (``encode_prompts``)."""
    return ddim_sample(method.student, method.schedule, latents, prompt_embeds, negative_embeds, method.student_steps,
                       guidance_scale, method.prediction_type, w_conditioned=method.w_conditioned)
