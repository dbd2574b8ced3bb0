"""The method registry: which file implements each distillation method and which class trains each of its phases.

A *method* is what a run file names in ``distill.method.kind``: a recipe that turns the teacher into a student in
one or more *phases* (its file's ``plan(cfg)`` lists them, ``plan_phases`` below calls it; each phase is its own
stage in the store). A phase's ``kind`` selects the class whose ``loss(batch, generator)`` the trainer minimises
during that phase (the ``DistillMethod`` protocol of ``common.py``); a multi-phase method has one class per kind of
phase (``w_conditioned``: ``w_stage1`` once, then ``w_halving`` per halving).

Adding a method, one file per method:

1. write ``methods/<name>.py`` with one class per phase kind, constructed as
   ``cls(cfg, phase, teacher, teacher_unet, student_unet)`` and exposing ``student``, ``schedule``
   (``training_schedule(cfg, teacher.schedule)``), ``student_steps``, ``prediction_type``, ``w_conditioned`` and
   ``loss``; shared pieces come from ``common.py`` and the math from :mod:`sd_distill.diffusion.math`; and a
   ``plan(cfg) -> list[PhaseSpec]`` giving its phases in training order (``config.halving_phases`` for halvings);
2. add one ``Method`` entry to ``METHODS`` below;
3. add its name to ``MethodKind`` and its phase kinds to ``PhaseKind`` (``config.py``: the Literals give the
   parameter schema its choices and a bad name its list of valid ones). A mismatch between ``METHODS`` and either
   Literal fails at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sd_distill.distill.methods import bksdm, cfg_aware, finetune, progressive, w_conditioned
from sd_distill.distill.methods.config import METHOD_KINDS, PHASE_KINDS, MethodConfig, PhaseSpec


@dataclass(frozen=True)
class Method:
    """One distillation method: the file that implements it, its phase plan and the class of each phase kind."""

    module: str  # the file, as a module name
    phases: dict[str, type]  # phase kind -> the class that trains it
    plan: Callable[[MethodConfig], list[PhaseSpec]]  # the method's phases, in training order


# the optional first phase of cfg_aware / w_conditioned / progressive (method.finetune_steps > 0)
FINETUNE = {"finetune": finetune.CuratedFinetune}
# the optional BK-SDM KD phase of cfg_aware / progressive before step distillation (method.kd_steps > 0)
KD = {"bksdm_kd": bksdm.BkSdmDistillation}

METHODS: dict[str, Method] = {
    "cfg_aware": Method(cfg_aware.__name__, {**FINETUNE, **KD, "cfg_aware": cfg_aware.CfgAwareDistillation}, cfg_aware.plan),
    "w_conditioned": Method(w_conditioned.__name__, {**FINETUNE, "w_stage1": w_conditioned.WConditionedStage1,
                                                     "w_halving": w_conditioned.WConditionedHalving},
                            w_conditioned.plan),
    "progressive": Method(progressive.__name__, {**FINETUNE, **KD, "progressive": progressive.ProgressiveDistillation},
                          progressive.plan),
    "bksdm_kd": Method(bksdm.__name__, KD, bksdm.plan),
}

# phase kind -> the class that trains it
PHASE_CLASSES: dict[str, type] = {kind: cls for method in METHODS.values() for kind, cls in method.phases.items()}

if set(METHODS) != set(METHOD_KINDS):
    raise RuntimeError(f"methods registry {sorted(METHODS)} does not match MethodKind {sorted(METHOD_KINDS)}")
if set(PHASE_CLASSES) != set(PHASE_KINDS):
    raise RuntimeError(f"phase classes {sorted(PHASE_CLASSES)} do not match PhaseKind {sorted(PHASE_KINDS)}")


def plan_phases(cfg: MethodConfig) -> list[PhaseSpec]:
    """The phases of ``cfg.kind``, in training order: the ``plan`` of its method's file.

    * cfg_aware, w_conditioned, progressive: with ``finetune_steps`` > 0, first the fine-tune phase (``finetune``);
      cfg_aware, progressive with a block-removed ``student_arch`` and ``kd_steps`` > 0: then a BK-SDM KD phase
      (``bksdm_kd``) whose light UNet the step phases distill.
    * cfg_aware: one phase, teacher_steps -> student_steps.
    * bksdm_kd: one phase (architecture distillation at the teacher's own step count = student_steps).
    * w_conditioned: stage 1 (match the CFG output at progressive_start_steps with a w-conditioned student),
      then halvings progressive_start_steps -> ... -> student_steps.
    * progressive: halvings only.
    """
    return METHODS[cfg.kind].plan(cfg)


def phase_class(kind: str) -> type:
    """The class that trains a phase of ``kind``; an error listing the valid kinds otherwise."""
    if kind not in PHASE_CLASSES:
        raise ValueError(f"unknown phase kind {kind!r}; valid: {', '.join(PHASE_CLASSES)}")
    return PHASE_CLASSES[kind]
