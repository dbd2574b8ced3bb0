"""The method registry: which file implements each distillation method and which class trains each of its phases.

A *method* is what a run file names in ``distill.method.kind``: a recipe that turns the teacher into a student in
one or more *phases* (``plan_phases`` in ``config.py`` lists them; each phase is its own stage in the store). A
phase's ``kind`` selects the class whose ``loss(batch, generator)`` the trainer minimises during that phase
(the ``DistillMethod`` protocol of ``common.py``); a multi-phase method has one class per kind of phase
(``w_conditioned``: ``w_stage1`` once, then ``w_halving`` per halving).

Adding a method, one file per method:

1. write ``methods/<name>.py`` with one class per phase kind, constructed as
   ``cls(cfg, phase, teacher, teacher_unet, student_unet)`` and exposing ``student``, ``schedule``
   (``training_schedule(cfg, teacher.schedule)``), ``student_steps``, ``prediction_type``, ``w_conditioned`` and
   ``loss``; shared pieces come from ``common.py`` and the math from :mod:`sd_distill.diffusion.math`;
2. add its name to ``MethodKind`` and its phase kinds to ``PhaseSpec.kind`` (``config.py``), and its phases to
   ``plan_phases``;
3. add one ``Method`` entry to ``METHODS`` below. A mismatch between ``METHODS`` and ``MethodKind`` fails at import.
"""

from __future__ import annotations

from dataclasses import dataclass

from sd_distill.distill.methods.bksdm import BkSdmDistillation
from sd_distill.distill.methods.cfg_aware import CfgAwareDistillation
from sd_distill.distill.methods.config import METHOD_KINDS
from sd_distill.distill.methods.progressive import ProgressiveDistillation
from sd_distill.distill.methods.w_conditioned import WConditionedHalving, WConditionedStage1


@dataclass(frozen=True)
class Method:
    """One distillation method: the file that implements it and the class of each of its phase kinds."""

    module: str  # the file, as a module name
    phases: dict[str, type]  # phase kind -> the class that trains it


_PACKAGE = "sd_distill.distill.methods"

METHODS: dict[str, Method] = {
    "cfg_aware": Method(f"{_PACKAGE}.cfg_aware", {"cfg_aware": CfgAwareDistillation}),
    "w_conditioned": Method(f"{_PACKAGE}.w_conditioned", {"w_stage1": WConditionedStage1,
                                                          "w_halving": WConditionedHalving}),
    "progressive": Method(f"{_PACKAGE}.progressive", {"progressive": ProgressiveDistillation}),
    "bksdm_kd": Method(f"{_PACKAGE}.bksdm", {"bksdm_kd": BkSdmDistillation}),
}

if set(METHODS) != set(METHOD_KINDS):
    raise RuntimeError(f"methods registry {sorted(METHODS)} does not match MethodKind {sorted(METHOD_KINDS)}")

# phase kind -> the class that trains it
PHASE_CLASSES: dict[str, type] = {kind: cls for method in METHODS.values() for kind, cls in method.phases.items()}


def phase_class(kind: str) -> type:
    """The class that trains a phase of ``kind``; an error listing the valid kinds otherwise."""
    if kind not in PHASE_CLASSES:
        raise ValueError(f"unknown phase kind {kind!r}; valid: {', '.join(PHASE_CLASSES)}")
    return PHASE_CLASSES[kind]
