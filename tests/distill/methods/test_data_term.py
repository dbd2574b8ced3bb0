"""The data term of the multi-loss: SD's own denoising objective on the curated latent, in the student's
prediction space, pinned to diffusers' targets (noise / sample / ``get_velocity``) for every prediction type, and
wired into cfg_aware, progressive and w_conditioned."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from sd_distill.diffusion.math import to_x0
from sd_distill.diffusion.schedule import NoiseSchedule
from sd_distill.distill.methods import MethodConfig, build_method, make_student, plan_phases
from sd_distill.distill.methods.common import data_loss
from tests._fixtures_methods import PREDICTION_TYPES, prompt_batch, train


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_data_loss_is_sds_objective_against_diffusers_targets(prediction_type):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500, 100, 3])
    z_t = sched.add_noise(x0, noise, t)
    target = {"epsilon": noise, "sample": x0, "v_prediction": sched.get_velocity(x0, noise, t)}[prediction_type]
    pred = target + 0.1 * torch.randn(target.shape, generator=g)  # a model output in its own prediction type
    a, s = NoiseSchedule.from_scheduler(sched).alphas_sigmas(t)
    got = data_loss(to_x0(pred, z_t, a, s, prediction_type), x0, z_t, a, s, prediction_type)
    assert torch.allclose(got, torch.nn.functional.mse_loss(pred, target), rtol=1e-4, atol=1e-7)
    # restricted to rows (the noised curated latents); none of them: exactly 0
    rows = torch.tensor([True, False, True, False])
    part = data_loss(to_x0(pred, z_t, a, s, prediction_type), x0, z_t, a, s, prediction_type, rows=rows)
    assert torch.allclose(part, torch.nn.functional.mse_loss(pred[rows], target[rows]), rtol=1e-4, atol=1e-7)
    none = data_loss(to_x0(pred, z_t, a, s, prediction_type), x0, z_t, a, s, prediction_type, rows=rows & False)
    assert float(none) == 0.0


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("kind", ["cfg_aware", "progressive", "w_conditioned"])
def test_multi_loss_adds_the_weighted_data_term_and_data_only_training_denoises(load_tiny_teacher, kind,
                                                                               prediction_type):
    teacher = load_tiny_teacher(prediction_type)
    batch = prompt_batch(teacher)
    extra = {"trajectory_fraction": 0.5} if kind == "cfg_aware" else {}
    cfg = MethodConfig(kind=kind, teacher_steps=4, student_steps=2, progressive_start_steps=4, w_embed_dim=16,
                       data_loss_weight=2.0, **extra)
    phase = plan_phases(cfg)[0]
    method = build_method(cfg, phase, teacher, teacher.unet, make_student(cfg, teacher.unet, phase))
    loss, logs = method.loss(batch, torch.Generator().manual_seed(0))
    logs = {k: float(v) for k, v in logs.items()}  # detached device scalars
    distill = logs["loss_distill"] if kind == "w_conditioned" else logs["loss_cfg"] + logs["loss_vanilla"]
    assert logs["loss_data"] > 0
    assert float(loss.detach()) == pytest.approx(distill + 2.0 * logs["loss_data"], rel=1e-5)

    if kind != "cfg_aware":
        return  # progressive shares cfg_aware's loss; w_conditioned's distillation term cannot be switched off
    only = MethodConfig(kind=kind, teacher_steps=4, student_steps=2, progressive_start_steps=4,
                        cfg_loss_weight=0.0, vanilla_loss_weight=0.0, data_loss_weight=1.0, trajectory_fraction=0.0)
    method = build_method(only, phase, teacher, teacher.unet, make_student(only, teacher.unet, phase))
    batch = prompt_batch(teacher, seed=7)  # latents the teacher was not pre-trained on

    def held_out() -> float:  # the same timesteps and noise before and after training
        with torch.no_grad():
            return sum(float(method.loss(batch, torch.Generator().manual_seed(100 + i))[0]) for i in range(8))

    before = held_out()
    train(method, batch, steps=20, lr=1e-3)
    assert held_out() < 0.8 * before  # SD's objective goes down on the fixed batch


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_caption_dropout_in_the_data_term_regresses_the_unconditional_output(load_tiny_teacher, prediction_type):
    """data_uncond_fraction 1: the data term is SD's objective on the student's unconditional output, i.e. the same
    loss as fraction 0 on a batch whose captions are the negative prompt (same timesteps and noise: the dropout draw
    comes after every other draw); fraction 0 trains the conditional output only, as before."""
    teacher = load_tiny_teacher(prediction_type)
    batch = prompt_batch(teacher)
    dropped = dict(batch, prompt_embeds=batch["negative_embeds"].expand_as(batch["prompt_embeds"]))

    def loss(fraction: float, b: dict) -> float:
        cfg = MethodConfig(teacher_steps=4, student_steps=2, cfg_loss_weight=0.0, vanilla_loss_weight=0.0,
                           data_loss_weight=1.0, trajectory_fraction=0.0, data_uncond_fraction=fraction)
        phase = plan_phases(cfg)[0]
        method = build_method(cfg, phase, teacher, teacher.unet, make_student(cfg, teacher.unet, phase))
        with torch.no_grad():
            return float(method.loss(b, torch.Generator().manual_seed(3))[0])

    uncond_only, cond_only = loss(1.0, batch), loss(0.0, batch)
    assert uncond_only == pytest.approx(loss(0.0, dropped), rel=1e-6)
    assert abs(uncond_only - cond_only) > 1e-4 * cond_only  # the two outputs differ, so the test can tell them apart
    assert MethodConfig().data_uncond_fraction == 0.1  # SD 1.5's caption dropout


def test_data_term_is_refused_where_it_does_not_fit():
    with pytest.raises(ValidationError, match="kd_task_weight"):
        MethodConfig(kind="bksdm_kd", student_arch="bk-small", data_loss_weight=1.0)
    with pytest.raises(ValidationError, match="trajectory_fraction 1.0"):
        MethodConfig(data_loss_weight=1.0, trajectory_fraction=1.0)
    assert MethodConfig().data_loss_weight == 0.0  # off by default: the measured toy default has no data term
