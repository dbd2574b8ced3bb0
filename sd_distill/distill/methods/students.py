"""Student construction: a copy of the phase's teacher, optionally block-removed (BK-SDM) and/or w-conditioned."""

from __future__ import annotations

import copy

import torch

from sd_distill.distill.methods.bksdm import block_removed_unet
from sd_distill.distill.methods.config import MethodConfig, PhaseSpec
from sd_distill.distill.textcond import is_sdxl_unet


def with_w_conditioning(unet, embed_dim: int):
    """A copy of ``unet`` with ``time_cond_proj_dim = embed_dim`` (diffusers' guidance-embedding input).

    The new projection ``time_embedding.cond_proj`` (no bias) is zero-initialised, so the student's output equals
    the original's for every w until training moves it (Meng et al. 2023, stage 1 initialisation).
    """
    from diffusers import UNet2DConditionModel  # deferred: heavy (diffusers)

    if unet.config.time_cond_proj_dim is not None:
        return copy.deepcopy(unet)
    config = dict(unet.config)
    config["time_cond_proj_dim"] = embed_dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise RuntimeError(f"w-conditioning: unexpected weight mismatch (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student.to(device=next(unet.parameters()).device, dtype=next(unet.parameters()).dtype)


def check_student_arch(student_arch: str, sdxl: bool) -> None:
    """BK-SDM block removal is defined for SD 1.x / 2.x UNets only; refuse it for an SDXL teacher."""
    if sdxl and student_arch != "same":
        raise ValueError(f"student_arch {student_arch!r} (BK-SDM block removal) is not supported for SDXL teachers "
                         "(its stages, transformer depths and added text/time conditioning differ from SD 1.x / 2.x); "
                         "use student_arch='same' with an SDXL teacher")


def make_student(cfg: MethodConfig, teacher_unet, phase: PhaseSpec):
    """The phase's student UNet, trainable, initialised from ``teacher_unet`` (the phase's teacher).

    * a ``finetune`` phase: a copy of the teacher, whatever ``student_arch`` (the teacher itself is fine-tuned);
    * the first distillation phase (phase 0, or ``new_student`` after a fine-tune) with ``student_arch`` bk-*:
      BK-SDM block removal of the teacher (see :mod:`.bksdm`); later phases copy their teacher, which is then
      already block-removed;
    * an SDXL teacher (``addition_embed_type="text_time"``) only with ``student_arch="same"``;
    * ``phase.w_conditioned``: adds a zero-initialised guidance-embedding input (``time_cond_proj_dim``);
    * otherwise a deep copy.
    """
    check_student_arch(cfg.student_arch, is_sdxl_unet(teacher_unet))
    if phase.kind == "finetune":
        student = copy.deepcopy(teacher_unet)
    elif (phase.index == 0 or phase.new_student) and cfg.student_arch != "same":
        student = block_removed_unet(teacher_unet, cfg.student_arch)
    else:
        student = copy.deepcopy(teacher_unet)
    if phase.w_conditioned:
        student = with_w_conditioning(student, cfg.w_embed_dim)
    student.requires_grad_(True).train()
    return student
