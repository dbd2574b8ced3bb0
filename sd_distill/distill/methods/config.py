"""Method configuration and the phases a method runs (each method file plans its own: ``plan(cfg)``).

Each :class:`PhaseSpec` becomes its own stage-store entry, so a failed progressive halving reruns alone.
"""

from __future__ import annotations

from typing import Literal, Optional, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

MethodKind = Literal["cfg_aware", "w_conditioned", "progressive", "bksdm_kd"]  # registry.METHODS, checked at import
# the registry's phase classes
PhaseKind = Literal["finetune", "cfg_aware", "w_stage1", "w_halving", "progressive", "bksdm_kd"]
StudentArch = Literal["same", "bk-base", "bk-small", "bk-tiny"]
METHOD_KINDS: tuple[str, ...] = get_args(MethodKind)
PHASE_KINDS: tuple[str, ...] = get_args(PhaseKind)
STUDENT_ARCHS: tuple[str, ...] = get_args(StudentArch)

# The share of training states taken from the teacher's guided sampler when a run does not set it. cfg_aware: 0.5,
# the measured toy default (student 8 steps, 200 prompts: FID 108.0 / CLIP 70.28 / HPS 68.63 against 102.3 / 69.99
# / 66.32 with data states only; docs/benchmarks.md). Every other kind: 0 (progressive was not measured with
# trajectory states; w_conditioned / bksdm_kd do not implement them). Set 0 for SnapFusion's data states.
TRAJECTORY_FRACTION_DEFAULTS = {"cfg_aware": 0.5, "progressive": 0.0, "w_conditioned": 0.0, "bksdm_kd": 0.0}


class MethodConfig(BaseModel):
    """What to distill and how. The defaults are the reference method's (SnapFusion-style one-stage 16 -> 8),
    except ``trajectory_fraction`` (see ``TRAJECTORY_FRACTION_DEFAULTS``); every default lives here, so a run file's
    ``method:`` block and ``MethodConfig()`` mean the same."""

    model_config = ConfigDict(extra="forbid")

    kind: MethodKind = "cfg_aware"  # the reference method
    teacher_steps: int = Field(16, ge=2)  # teacher DDIM steps the student imitates (16 or 32 in the reference)
    student_steps: int = Field(8, ge=1)  # student steps at inference (8 in the reference)
    guidance_min: float = Field(2.0, ge=1.0)  # guidance scale s (diffusers form) sampled uniformly from [min, max]
    guidance_max: float = Field(14.0, ge=1.0)  # upper end of that range (SnapFusion uses [2, 14])
    cfg_loss_weight: float = Field(1.0, ge=0.0)  # weight of the CFG-aware term (student+CFG vs teacher+CFG)
    vanilla_loss_weight: float = Field(1.0, ge=0.0)  # weight of the plain step-distillation term (no guidance)
    data_loss_weight: float = Field(0.0, ge=0.0)  # cfg_aware / progressive / w_conditioned: weight of the denoising
    # term on the curated latent itself (SD's objective in the student's prediction space; the reference's
    # "multi-loss" adds it to the two distillation terms). 0: distillation terms only (the measured defaults)
    data_uncond_fraction: float = Field(0.1, ge=0.0, le=1.0)  # cfg_aware / progressive: share of the data term's
    # rows on which the student's unconditional output (negative prompt) is regressed onto the curated latent
    # instead of its conditional one: SD's caption dropout (SD 1.5 trained with 10%), so the unconditional
    # prediction that CFG extrapolates from learns the curated set too. 0: conditional output only
    finetune_steps: int = Field(0, ge=0)  # cfg_aware / progressive / w_conditioned: optimizer steps of a first phase
    # that fine-tunes a copy of the teacher on the curated set with SD's own objective (caption dropout
    # data_uncond_fraction; methods/finetune.py); the distillation phases then learn from the fine-tuned UNet.
    # 0: no such phase, the student learns from the teacher as it is
    finetune_lr: Optional[float] = Field(None, gt=0)  # that phase's peak learning rate; None: trainer.lr
    finetune_batch_size: Optional[int] = Field(None, ge=1)  # that phase's micro-batch; None: trainer.batch_size (one
    # UNet forward per row, against up to 2 + 2k for a distillation row, so it affords a larger batch)
    loss_space: Literal["x0", "epsilon", "v", "endpoint"] = "v"  # space the MSE is measured in (v: SnapFusion's
    # choice; endpoint: the latent where the student's DDIM step lands vs where the teacher's steps land)
    snr_weighting: Literal["none", "snr", "truncated_snr", "min_snr_5"] = "none"  # per-timestep weight (see math)
    trajectory_fraction: Optional[float] = Field(None, ge=0.0, le=1.0)  # cfg_aware / progressive: share of training
    # states taken from the teacher's own guided sampler (from noise) instead of noised curated latents (0:
    # SnapFusion's data states; costs up to N-1 extra teacher intervals per such sample); None (unset): the kind's
    # entry in TRAJECTORY_FRACTION_DEFAULTS, filled in on validation (a validated config always holds a number)
    timestep_spacing: Literal["trailing", "leading", "linspace", "teacher"] = "trailing"  # student/teacher DDIM grid;
    # trailing starts at t = T-1 and nests (the 2N grid refines the N grid); "teacher" keeps the teacher scheduler's
    progressive_start_steps: int = Field(32, ge=2)  # w_conditioned/progressive: teacher steps of the first halving
    w_embed_dim: int = Field(256, ge=2)  # w_conditioned: UNet time_cond_proj_dim (guidance embedding width)
    student_arch: StudentArch = "same"  # student UNet (BK-SDM block removal)
    kd_steps: int = Field(0, ge=0)  # cfg_aware / progressive with a block-removed student_arch: optimizer steps of a
    # BK-SDM knowledge-distillation phase (task + output + feature KD, methods/bksdm.py) that trains the block-removed
    # UNet against the (fine-tuned) teacher before step distillation; the step phases then distill that light model,
    # as the reference distils BK-SDM-Tiny. 0: the first step phase block-removes the teacher and learns from it
    kd_lr: Optional[float] = Field(None, gt=0)  # that phase's peak learning rate; None: trainer.lr
    kd_batch_size: Optional[int] = Field(None, ge=1)  # that phase's micro-batch; None: trainer.batch_size
    kd_task_weight: float = Field(1.0, ge=0.0)  # bksdm_kd: denoising task loss weight (BK-SDM uses 1)
    kd_out_weight: float = Field(1.0, ge=0.0)  # bksdm_kd: output-level KD weight (BK-SDM uses 1)
    kd_feat_weight: float = Field(1.0, ge=0.0)  # bksdm_kd: feature-level KD weight (BK-SDM uses 1)

    @model_validator(mode="after")
    def _consistent(self) -> "MethodConfig":
        if self.trajectory_fraction is None:
            self.trajectory_fraction = TRAJECTORY_FRACTION_DEFAULTS[self.kind]
        if self.guidance_max < self.guidance_min:
            raise ValueError(f"guidance_max ({self.guidance_max}) < guidance_min ({self.guidance_min})")
        if self.kind in ("cfg_aware",):
            if self.teacher_steps <= self.student_steps or self.teacher_steps % self.student_steps:
                raise ValueError(f"cfg_aware: teacher_steps ({self.teacher_steps}) must be a multiple > 1 of "
                                 f"student_steps ({self.student_steps}), e.g. 16 -> 8 or 32 -> 8")
            if self.cfg_loss_weight == 0 and self.vanilla_loss_weight == 0 and self.data_loss_weight == 0:
                raise ValueError("cfg_loss_weight, vanilla_loss_weight and data_loss_weight are all 0: nothing to train")
        if self.loss_space == "endpoint" and self.snr_weighting != "none":
            raise ValueError(f"loss_space 'endpoint' weights each step by where it lands; snr_weighting must be 'none' "
                             f"(got {self.snr_weighting!r})")
        if self.trajectory_fraction > 0 and self.kind not in ("cfg_aware", "progressive"):
            raise ValueError(f"trajectory_fraction is implemented for cfg_aware and progressive, not {self.kind!r}")
        if self.data_loss_weight > 0 and self.kind == "bksdm_kd":
            raise ValueError("bksdm_kd has its own denoising term: set kd_task_weight, not data_loss_weight")
        if self.data_loss_weight > 0 and self.trajectory_fraction == 1.0:
            raise ValueError("data_loss_weight needs noised curated latents, but trajectory_fraction 1.0 takes every "
                             "training state from the teacher's sampler; lower trajectory_fraction")
        if self.finetune_steps and self.kind == "bksdm_kd":
            raise ValueError("finetune_steps is implemented for cfg_aware, progressive and w_conditioned; bksdm_kd has "
                             "its own denoising term (kd_task_weight)")
        if self.kd_steps and (self.kind not in ("cfg_aware", "progressive") or self.student_arch == "same"):
            raise ValueError(f"kd_steps (a BK-SDM KD phase before step distillation) needs kind cfg_aware or progressive "
                             f"and a block-removed student_arch, got kind {self.kind!r}, student_arch "
                             f"{self.student_arch!r}" + ("; bksdm_kd trains trainer.max_steps KD steps itself"
                                                         if self.kind == "bksdm_kd" else ""))
        if self.kind == "bksdm_kd" and self.student_arch == "same":
            raise ValueError(f"bksdm_kd needs a block-removed student_arch; valid: {list(STUDENT_ARCHS[1:])}")
        if self.kind in ("w_conditioned", "progressive"):
            s, e = self.progressive_start_steps, self.student_steps
            if s <= e or s % e or (s // e) & (s // e - 1):
                raise ValueError(f"{self.kind}: progressive_start_steps ({s}) must be student_steps ({e}) times a "
                                 "power of two >= 2 (each phase halves the steps)")
        return self


class PhaseSpec(BaseModel):
    """One training stage of a method."""

    model_config = ConfigDict(extra="forbid")

    index: int  # position in the plan, 0-based
    name: str  # stable, filesystem-safe name, e.g. "halving-32-16"
    teacher_steps: int  # steps the phase's teacher runs for one student interval grid
    student_steps: int  # steps the phase's student is trained to sample with
    kind: PhaseKind  # which loss the phase uses
    w_conditioned: bool = False  # the phase's student (and, for halvings, its teacher) take a guidance embedding
    max_steps: Optional[int] = Field(None, ge=1)  # this phase's optimizer steps; None: trainer.max_steps
    lr: Optional[float] = Field(None, gt=0)  # this phase's peak learning rate; None: trainer.lr
    batch_size: Optional[int] = Field(None, ge=1)  # this phase's micro-batch; None: trainer.batch_size
    new_student: bool = False  # the student is made from this phase's teacher (make_student) although an earlier
    # phase exists: the phase after a fine-tune, whose teacher is the fine-tuned UNet


def chain_phases(*groups: list[PhaseSpec]) -> list[PhaseSpec]:
    """``groups`` (e.g. [fine-tune], [KD], [step phases]) as one plan: numbered in order, each phase the teacher and
    initial student of the next, except that the phase after a ``finetune`` phase makes a new student from the
    fine-tuned UNet (``new_student``) instead of starting from the fine-tuned teacher itself."""
    out: list[PhaseSpec] = []
    for phase in (p for group in groups for p in group):
        new = bool(out) and out[-1].kind == "finetune"
        out.append(phase.model_copy(update={"index": len(out), "new_student": new or phase.new_student}))
    return out


def training_schedule(cfg: MethodConfig, teacher_schedule):
    """The teacher's noise schedule with the DDIM grid the method trains (and the student samples) on."""
    if cfg.timestep_spacing == "teacher":
        return teacher_schedule
    return teacher_schedule.with_spacing(cfg.timestep_spacing)


def halving_phases(cfg: MethodConfig, kind: str, *, w_conditioned: bool = False, first_index: int = 0) -> list[PhaseSpec]:
    """Phases of ``kind`` that halve the steps, progressive_start_steps -> ... -> student_steps, numbered from
    ``first_index`` (progressive and w_conditioned plans)."""
    phases: list[PhaseSpec] = []
    steps = cfg.progressive_start_steps
    while steps > cfg.student_steps:
        phases.append(PhaseSpec(index=first_index + len(phases), name=f"halving-{steps}-{steps // 2}",
                                teacher_steps=steps, student_steps=steps // 2, kind=kind, w_conditioned=w_conditioned))
        steps //= 2
    return phases
