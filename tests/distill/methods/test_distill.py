"""The step-distillation property: after a short training on a fixed tiny batch, the student's N-step output, from the same
noise and prompts, is closer to the teacher's guided 2N-step output than the teacher's own N-step output is
(mean relative distance over 11 noise draws, with a 10% margin) -- for every step-distillation method and every
teacher prediction type. BK-SDM students (architecture distillation,
no step reduction) must get closer to the teacher than their block-removed initialisation is."""

from __future__ import annotations

import pytest
import torch

from sd_distill.distill.methods import MethodConfig, build_method, make_student, plan_phases, sample_student
from tests._fixtures_methods import PREDICTION_TYPES, prompt_batch, run_phases, step_gap, train

N = 1  # student steps; the teacher reference runs 2N (trailing grid: 999 -> final vs 999 -> 499 -> final)
GUIDANCE = 5.0  # the guidance scale s trained and evaluated (diffusers form)
STEPS, LR = 60, 1e-4  # Adam steps per phase and learning rate
W_STEPS, W_LR = 200, 1e-4  # w_conditioned: the zero-initialised guidance input needs more steps. 3e-4
# overshoots with a sample-prediction teacher: its halving loss rose while training and the
# student's mean distance was 0.36 vs the 1-step teacher's 0.26 (0.20 at 1e-4 x 200).


@pytest.mark.slow
@pytest.mark.parametrize("prediction_type, kind", [
    (p, k) for k in ("cfg_aware", "progressive", "w_conditioned") for p in PREDICTION_TYPES])
def test_student_n_steps_lands_closer_to_guided_teacher_2n_than_teacher_n(load_tiny_teacher, kind, prediction_type):
    teacher = load_tiny_teacher(prediction_type)
    batch = prompt_batch(teacher)
    cfg = MethodConfig(kind=kind, teacher_steps=2 * N, student_steps=N, progressive_start_steps=2 * N,
                       guidance_min=GUIDANCE, guidance_max=GUIDANCE, w_embed_dim=16, trajectory_fraction=0.0)
    steps, lr = (W_STEPS, W_LR) if kind == "w_conditioned" else (STEPS, LR)
    method = run_phases(cfg, teacher, batch, steps, lr)
    gap = step_gap(teacher, method, batch, GUIDANCE, N)
    assert gap["student"] < 0.9 * gap["teacher_n"], gap


@pytest.mark.slow
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_bksdm_kd_brings_block_removed_student_closer_to_teacher(load_tiny_teacher, prediction_type):
    teacher = load_tiny_teacher(prediction_type)
    batch = prompt_batch(teacher)
    cfg = MethodConfig(kind="bksdm_kd", student_arch="bk-small", student_steps=2)
    (phase,) = plan_phases(cfg)
    student = make_student(cfg, teacher.unet, phase)
    method = build_method(cfg, phase, teacher, teacher.unet, student)
    z = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(7))
    from sd_distill.diffusion.sampling import ddim_sample

    ref = ddim_sample(teacher.unet, method.schedule, z, batch["prompt_embeds"], batch["negative_embeds"], 2, GUIDANCE,
                      prediction_type)

    def distance() -> float:
        method.student.eval()
        out = sample_student(method, z, batch["prompt_embeds"], batch["negative_embeds"], GUIDANCE)
        method.student.train()
        return float((out - ref).norm() / ref.norm())

    before = distance()
    losses = train(method, batch, STEPS, 1e-3)
    after = distance()
    method.close()
    assert sum(losses[-10:]) < sum(losses[:10])
    assert after < 0.8 * before, (before, after)
