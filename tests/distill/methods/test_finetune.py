"""The fine-tune phase (``method.finetune_steps``): a copy of the teacher trained on SD's own objective on the curated
set before step distillation. Its loss is pinned to diffusers' targets for every prediction type, its caption dropout
to the negative prompt (SDXL text conditioning included), its place in each method's plan, and the chain: the first
distillation phase after it distils from the fine-tuned UNet and makes its (block-removed) student from it."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from sd_distill.distill.methods import MethodConfig, build_method, make_student, plan_phases
from sd_distill.distill.methods.common import random_timesteps, randn
from tests._fixtures_distill import tiny_params
from tests._fixtures_methods import PREDICTION_TYPES, prompt_batch


def _dropout_loss(teacher, fraction: float, batch: dict, seed: int) -> float:
    """The fine-tune loss at caption-dropout ``fraction`` on ``batch``, with fixed draws."""
    method = _method(MethodConfig(finetune_steps=5, data_uncond_fraction=fraction), teacher)
    with torch.no_grad():
        return float(method.loss(batch, torch.Generator().manual_seed(seed))[0])


def _method(cfg, teacher):
    phase = plan_phases(cfg)[0]
    assert phase.kind == "finetune"
    return build_method(cfg, phase, teacher, teacher.unet, make_student(cfg, teacher.unet, phase))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_finetune_loss_is_sds_objective_at_every_timestep_against_diffusers_targets(load_tiny_teacher, prediction_type):
    """Fraction 0: MSE between the student's raw output and diffusers' target (noise / sample / get_velocity) at
    t ~ U{0..T-1}, z_t from DDPMScheduler.add_noise, with the draws in the phase's order (t, then noise)."""
    from diffusers import DDPMScheduler

    teacher = load_tiny_teacher(prediction_type)
    batch = prompt_batch(teacher)
    cfg = MethodConfig(finetune_steps=5, data_uncond_fraction=0.0)
    method = _method(cfg, teacher)
    with torch.no_grad():
        got, logs = method.loss(batch, torch.Generator().manual_seed(11))

    sched = DDPMScheduler.from_config(teacher.scheduler.config)
    g = torch.Generator().manual_seed(11)
    x0 = batch["latents"]
    t = random_timesteps(2, sched.config.num_train_timesteps, g, "cpu")
    noise = randn(x0.shape, g, "cpu")
    z_t = sched.add_noise(x0, noise, t)
    target = {"epsilon": noise, "sample": x0, "v_prediction": sched.get_velocity(x0, noise, t)}[prediction_type]
    with torch.no_grad():
        out = method.student(z_t, t, encoder_hidden_states=batch["prompt_embeds"]).sample
    assert float(got) == pytest.approx(float(torch.nn.functional.mse_loss(out, target)), rel=1e-4)
    assert float(logs["uncond_fraction"]) == 0.0
    grid = set(method.schedule.timesteps(8).tolist())
    assert not set(t.tolist()) <= grid  # every training timestep can be drawn, not only a sampling grid's


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_finetune_caption_dropout_trains_the_negative_prompt(load_tiny_teacher, prediction_type):
    """Fraction 1 is fraction 0 on a batch whose captions are the negative prompt (SD's caption dropout)."""
    teacher = load_tiny_teacher(prediction_type)
    batch = prompt_batch(teacher)
    dropped = dict(batch, prompt_embeds=batch["negative_embeds"].expand_as(batch["prompt_embeds"]))

    def loss(fraction: float, b: dict) -> float:
        return _dropout_loss(teacher, fraction, b, seed=3)

    assert loss(1.0, batch) == pytest.approx(loss(0.0, dropped), rel=1e-6)
    assert abs(loss(1.0, batch) - loss(0.0, batch)) > 1e-6


@pytest.mark.parametrize("kind", ["cfg_aware", "progressive", "w_conditioned"])
def test_plans_start_with_the_finetune_phase_when_asked(kind):
    base = dict(kind=kind, teacher_steps=16, student_steps=8, progressive_start_steps=32)
    plain = plan_phases(MethodConfig(**base))
    tuned = plan_phases(MethodConfig(**base, finetune_steps=300, finetune_lr=1e-4, finetune_batch_size=32))
    first = tuned[0]
    assert (first.kind, first.index, first.name, first.max_steps, first.lr, first.batch_size) == \
        ("finetune", 0, "finetune-300", 300, 1e-4, 32)
    assert [p.index for p in tuned] == list(range(len(plain) + 1))
    assert [(p.name, p.kind) for p in tuned[1:]] == [(p.name, p.kind) for p in plain]
    assert tuned[1].new_student and not any(p.new_student for p in tuned[2:] + plain)
    assert MethodConfig().finetune_steps == 0  # off by default
    with pytest.raises(ValidationError, match="finetune_steps"):
        MethodConfig(kind="bksdm_kd", student_arch="bk-small", finetune_steps=10)


def test_distillation_after_a_finetune_learns_from_the_finetuned_unet(tiny_teacher, tiny_cache, tmp_path):
    """Whole chain on the trainer: the fine-tune phase runs its own step count and keeps the teacher's architecture
    even for a BK student; the next phase's teacher is the fine-tuned UNet and its student is block-removed from it."""
    from diffusers import UNet2DConditionModel

    from sd_distill.distill.trainer import train_phase

    params = tiny_params(tiny_teacher, method={"teacher_steps": 4, "student_steps": 2, "student_arch": "bk-small",
                                               "finetune_steps": 3, "finetune_lr": 1e-3,
                                               "finetune_batch_size": 4}, max_steps=2)

    phases = plan_phases(params.method)
    tuned = train_phase(params, phases[0], tiny_cache, tmp_path / "ft")
    distilled = train_phase(params, phases[1], tiny_cache, tmp_path / "cfg", teacher_unet_ref=tmp_path / "ft",
                            student_init_ref=tmp_path / "ft")
    original = UNet2DConditionModel.from_pretrained(str(tiny_teacher / "unet"))
    ft = UNet2DConditionModel.from_pretrained(str(tmp_path / "ft" / "unet"))
    st = UNet2DConditionModel.from_pretrained(str(tmp_path / "cfg" / "unet"))
    assert ft.config.down_block_types == original.config.down_block_types  # the teacher itself, fine-tuned
    assert sum(p.numel() for p in st.parameters()) < sum(p.numel() for p in ft.parameters())  # BK block removal
    moved = max(float((a - b).abs().max()) for a, b in zip(ft.state_dict().values(), original.state_dict().values()))
    assert moved > 0
    assert json.loads((tmp_path / "ft" / "phase.json").read_text())["steps"] == 3
    assert tuned["samples_per_s"] > 0 and tuned["phase"]["batch_size"] == 4
    assert json.loads((tmp_path / "cfg" / "phase.json").read_text())["steps"] == 2
    assert tuned["phase"]["kind"] == "finetune" and distilled["phase"]["new_student"]
    assert distilled["teacher_unet"] == str(tmp_path / "ft") and distilled["student_init"] is None
    # the student started as the fine-tuned UNet with blocks removed, not as the original's: it is nearer the former

    def distance(a, b) -> float:
        sa, sb = a.state_dict(), b.state_dict()
        return max(float((sa[k] - sb[k]).abs().max()) for k in sa)

    from_ft, from_original = (make_student(params.method, u, phases[1]) for u in (ft, original))
    assert distance(st, from_ft) < distance(st, from_original)


def test_finetune_on_an_sdxl_teacher_drops_every_part_of_the_text_conditioning(sdxl_teachers):
    """SDXL batches carry TextCond (hidden states, pooled embedding, time ids): caption dropout swaps all of them for
    the negative prompt's, so fraction 1 equals fraction 0 on a batch whose captions are the negative prompt."""
    from tests._fixtures_sdxl import sdxl_batch

    teacher = sdxl_teachers("epsilon")
    batch = sdxl_batch(teacher)
    n = batch["latents"].shape[0]
    dropped = dict(batch, prompt_embeds=batch["negative_embeds"].expand_as(batch["prompt_embeds"]),
                   pooled_prompt_embeds=batch["negative_pooled_embeds"].expand(n, -1))

    def loss(fraction: float, b: dict) -> float:
        return _dropout_loss(teacher, fraction, b, seed=5)

    assert loss(1.0, batch) == pytest.approx(loss(0.0, dropped), rel=1e-6)
    assert abs(loss(1.0, batch) - loss(0.0, batch)) > 1e-7
