"""The demo's parameters (``make demo``, ``python -m flows.curate_and_distill`` without a run file): the parent flow's
defaults. Everything not named here is the parameter models' own default (``CurateParams()``, ``DistillParams()``).

* ``DEMO_CURATE``: one toy source of ``DEMO_TOY_N`` generated pairs at the published web-like mix (a quarter bad);
  the demo's HPS filter keeps the best 70%.
* ``DEMO_DISTILL``: the fine-tune phase on the curated set, then CFG-aware 16 -> 8 from the fine-tuned teacher. The
  fine-tune is what lets the curated set lift the student past its teacher (a distillation loss only pulls the
  student towards its teacher); its length, learning rate and batch are the measured toy values
  (docs/benchmarks.md, "Fine-tuning on the curated set first").
* ``DEMO_LIGHT``: the second demo deployment's parameters: the same student on ``toy:sd-lpb2`` (SD's UNet layout)
  and, from the same curated set and fine-tuned teacher, a block-removed (BK-SDM-Tiny) 8-step student, all in one
  report.
"""

from __future__ import annotations

from sd_distill.curate.config import CurateParams, SourceSpec
from sd_distill.distill.config import DistillParams

DEMO_TOY_N = 2000  # source pairs (1,400 kept by the filter): the curated set must hold enough scenes to learn from
# 1,000 x 64 curated samples (46 epochs of the 1,400) at the toy teacher's own peak lr, about 4.5 CPU-minutes.
# Measured (docs/benchmarks.md): shorter fine-tunes (700 x 64 at 1e-3, 1,000 x 32 at 3e-4) left the student worse than
# the teacher on toy-FID and within noise on CLIP; this one and 3,000 x 32 at 3e-4 did not
DEMO_FINETUNE = {"finetune_steps": 1000, "finetune_lr": 1e-3, "finetune_batch_size": 64}
# distillation steps after the fine-tune (100, under a CPU-minute): the fine-tuned teacher already samples well at 8
# DPM-Solver++ steps; after 3,000 fine-tune steps, 20 and 600 distillation steps scored close (CLIP 60.0 vs 61.6,
# toy-HPS 61.0 vs 61.6, attribute accuracy 0.687 vs 0.698 on 300 prompts)
DEMO_DISTILL_STEPS = 100

# `make demo-light` (deployment curate-and-distill/demo-light): the same recipe on `toy:sd-lpb2` (SD's two (resnet,
# attention) pairs per UNet down stage, which BK-SDM removal needs), plus a BK-SDM-Tiny student: block removal of
# the fine-tuned teacher, BK-SDM's KD (1,000 x 64 at lr 1e-3, about 6 CPU-minutes), then CFG-aware 16 -> 8 from that
# light UNet, as the reference distils BK-SDM-Tiny
DEMO_LIGHT_TEACHER = "toy:sd-lpb2"
DEMO_KD = {"student_arch": "bk-tiny", "kd_steps": 1000, "kd_lr": 1e-3, "kd_batch_size": 64}

DEMO_CURATE = CurateParams(sources=[SourceSpec(kind="toy", toy_n=DEMO_TOY_N)])
DEMO_DISTILL = DistillParams.model_validate({"method": DEMO_FINETUNE, "trainer": {"max_steps": DEMO_DISTILL_STEPS}})


def _light_student(method: dict) -> dict:
    return {"teacher": DEMO_LIGHT_TEACHER, "method": method, "trainer": {"max_steps": DEMO_DISTILL_STEPS}}


# the demo-light deployment's parameters (deploy/prefect.yaml holds the same)
DEMO_LIGHT = {"distill": _light_student(DEMO_FINETUNE),
              "extra_students": {"student-bk-tiny": _light_student({**DEMO_FINETUNE, **DEMO_KD})}}
