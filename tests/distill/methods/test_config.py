"""Teacher loading, method configuration, phase plans, student construction and bad-input errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pydantic import ValidationError

from sd_distill.distill.methods import MethodConfig, build_method, make_student, plan_phases
from sd_distill.distill.methods.bksdm import block_removed_unet, feature_pairs
from tests._fixtures_methods import prompt_batch, teacher_folder


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_load_teacher_reads_every_component_and_the_prediction_type(load_tiny_teacher, prediction_type):
    teacher = load_tiny_teacher(prediction_type)
    assert teacher.prediction_type == prediction_type
    assert teacher.alphas_cumprod.shape == (1000,)
    assert not any(p.requires_grad for p in teacher.unet.parameters())
    assert teacher.schedule.timesteps(4).tolist() == [751, 501, 251, 1]  # SD's leading spacing, steps_offset 1


def test_encode_prompts_gives_padded_clip_embeddings(load_tiny_teacher):
    from sd_distill.distill.teacher import encode_prompts

    teacher = load_tiny_teacher("epsilon")
    emb = encode_prompts(teacher, ["a red cat", ""])
    assert emb.shape == (2, 77, 32)
    assert not torch.allclose(emb[0], emb[1])
    with pytest.raises(TypeError, match="list"):
        encode_prompts(teacher, "a red cat")


def test_teacher_folder_missing_a_component_names_it(teacher_root, tmp_path):
    from sd_distill.distill.teacher import load_teacher

    broken = tmp_path / "broken"
    shutil.copytree(teacher_folder(teacher_root, "epsilon"), broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=r"missing component\(s\) \['vae'\]"):
        load_teacher(str(broken))


def test_unknown_prediction_type_lists_valid_ones(teacher_root, tmp_path):
    from sd_distill.distill.teacher import load_teacher

    bad = tmp_path / "bad"
    shutil.copytree(teacher_folder(teacher_root, "epsilon"), bad)
    cfg_path = bad / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "prediction_type": "flow_prediction"}))
    with pytest.raises(ValueError, match=r"flow_prediction.*valid: \['epsilon', 'sample', 'v_prediction'\]"):
        load_teacher(str(bad))


def test_phase_plans_of_every_method():
    assert [p.name for p in plan_phases(MethodConfig())] == ["cfg-aware-16-8"]
    w = plan_phases(MethodConfig(kind="w_conditioned", progressive_start_steps=32, student_steps=8))
    assert [(p.kind, p.teacher_steps, p.student_steps) for p in w] == [
        ("w_stage1", 32, 32), ("w_halving", 32, 16), ("w_halving", 16, 8)]
    assert all(p.w_conditioned for p in w) and [p.index for p in w] == [0, 1, 2]
    prog = plan_phases(MethodConfig(kind="progressive", progressive_start_steps=64, student_steps=8))
    assert [p.name for p in prog] == ["halving-64-32", "halving-32-16", "halving-16-8"]
    kd = plan_phases(MethodConfig(kind="bksdm_kd", student_arch="bk-small"))
    assert [(p.kind, p.teacher_steps, p.student_steps) for p in kd] == [("bksdm_kd", 8, 8)]


@pytest.mark.parametrize("bad, match", [
    ({"kind": "lcm"}, "cfg_aware"),
    ({"teacher_steps": 12, "student_steps": 8}, "multiple"),
    ({"kind": "progressive", "progressive_start_steps": 24}, "power of two"),
    ({"kind": "bksdm_kd"}, "bk-base"),
    ({"guidance_min": 8, "guidance_max": 2}, "guidance_max"),
    ({"loss_space": "pixels"}, "x0"),
    ({"loss_space": "endpoint", "snr_weighting": "snr"}, "snr_weighting must be 'none'"),
    ({"lr": 1e-4}, "extra"),
])
def test_bad_method_config_fails_with_valid_options(bad, match):
    with pytest.raises(ValidationError, match=match):
        MethodConfig(**bad)


@pytest.mark.parametrize("arch, n_down, has_mid", [("bk-base", 3, True), ("bk-small", 3, False), ("bk-tiny", 2, False)])
def test_block_removed_students_drop_blocks_and_copy_every_kept_weight(load_tiny_teacher, arch, n_down, has_mid):
    teacher = load_tiny_teacher("epsilon")
    student = block_removed_unet(teacher.unet, arch)
    assert len(student.down_blocks) == n_down and (student.mid_block is not None) == has_mid
    assert all(len(b.resnets) == 1 for b in student.down_blocks) and all(len(b.resnets) == 2 for b in student.up_blocks)
    assert student.bk_uncopied == []
    n_s, n_t = (sum(p.numel() for p in m.parameters()) for m in (student, teacher.unet))
    assert n_s < n_t
    t_state = teacher.unet.state_dict()
    up = 1 if arch == "bk-tiny" else 0
    assert torch.equal(student.state_dict()["up_blocks.0.resnets.1.conv1.weight"],
                       t_state[f"up_blocks.{up}.resnets.2.conv1.weight"])
    z = torch.randn(1, 4, 8, 8)
    out = student(z, torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, 32)).sample
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert len(feature_pairs(teacher.unet.config, arch)) == (6 if arch != "bk-tiny" else 4)


def test_make_student_copies_the_teacher_and_w_phase_adds_zero_init_guidance_input(load_tiny_teacher):
    teacher = load_tiny_teacher("epsilon")
    cfg = MethodConfig(kind="w_conditioned", student_steps=2, progressive_start_steps=4, w_embed_dim=8)
    stage1, halving = plan_phases(cfg)
    student = make_student(cfg, teacher.unet, stage1)
    assert student.config.time_cond_proj_dim == 8 and student is not teacher.unet
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) == 0
    assert all(p.requires_grad for p in student.parameters())
    again = make_student(cfg, student, halving)  # a halving copies its (already w-conditioned) teacher
    assert again.config.time_cond_proj_dim == 8 and again is not student


def test_architecture_mismatch_and_missing_w_input_are_clear_errors(load_tiny_teacher):
    from sd_distill.tiny.sd import tiny_unet

    teacher = load_tiny_teacher("epsilon")
    cfg = MethodConfig(teacher_steps=4, student_steps=2)
    phase = plan_phases(cfg)[0]
    wrong = tiny_unet(cross_attention_dim=64, block_out_channels=(16, 32, 32))
    with pytest.raises(ValueError, match="cross_attention_dim is 32 for the teacher but 64"):
        build_method(cfg, phase, teacher, teacher.unet, wrong)
    wcfg = MethodConfig(kind="w_conditioned", student_steps=2, progressive_start_steps=4)
    halving = plan_phases(wcfg)[1]
    with pytest.raises(ValueError, match="teacher UNet has no guidance input"):
        build_method(wcfg, halving, teacher, teacher.unet, make_student(wcfg, teacher.unet, halving))
    with pytest.raises(KeyError, match="negative_embeds"):
        method = build_method(cfg, phase, teacher, teacher.unet, make_student(cfg, teacher.unet, phase))
        method.loss({"latents": torch.zeros(1, 4, 8, 8), "prompt_embeds": torch.zeros(1, 77, 32)},
                    torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind, extra", [("cfg_aware", {}), ("progressive", {}), ("w_conditioned", {}),
                                         ("bksdm_kd", {"student_arch": "bk-tiny"}),
                                         ("cfg_aware", {"student_arch": "bk-small", "loss_space": "epsilon",
                                                        "snr_weighting": "min_snr_5"}),
                                         ("cfg_aware", {"loss_space": "endpoint"}),
                                         ("cfg_aware", {"trajectory_fraction": 1.0}),
                                         ("progressive", {"trajectory_fraction": 0.5}),
                                         ("w_conditioned", {"loss_space": "endpoint"})])
def test_every_phase_loss_is_finite_and_reaches_only_the_student(load_tiny_teacher, kind, extra):
    teacher = load_tiny_teacher("v_prediction")
    cfg = MethodConfig(kind=kind, teacher_steps=4, student_steps=2, progressive_start_steps=4, **extra)
    batch = prompt_batch(teacher)
    teacher_unet = teacher.unet
    for phase in plan_phases(cfg):
        student = make_student(cfg, teacher_unet, phase)
        method = build_method(cfg, phase, teacher, teacher_unet, student)
        loss, logs = method.loss(batch, torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss) and logs["loss"] == pytest.approx(float(loss.detach()))
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        assert all(p.grad is None for p in teacher.unet.parameters())
        teacher_unet = student.eval().requires_grad_(False)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_trajectory_states_follow_a_stock_ddim_scheduler_with_cfg(load_tiny_teacher, prediction_type):
    """teacher_trajectory_states: each row of a batch with mixed target times is the state a stock diffusers
    DDIMScheduler loop (trailing grid, CFG at that row's guidance) reaches at that time from the same noise."""
    from diffusers import DDIMScheduler

    from sd_distill.diffusion.schedule import NoiseSchedule
    from sd_distill.distill.methods.common import teacher_trajectory_states

    teacher = load_tiny_teacher(prediction_type)
    batch = prompt_batch(teacher)
    steps, n = 4, 4
    scheduler = DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    schedule = NoiseSchedule.from_scheduler(scheduler).with_spacing("trailing")
    grid = schedule.timesteps(steps)
    t = grid[torch.tensor([3, 0, 2, 1])]
    guidance = torch.tensor([2.0, 5.0, 7.5, 3.0])
    noise = torch.randn(n, *batch["latents"].shape[1:], generator=torch.Generator().manual_seed(3))
    cond = batch["prompt_embeds"].repeat(2, 1, 1)
    uncond = batch["negative_embeds"].expand(n, -1, -1)
    got = teacher_trajectory_states(teacher.unet, schedule, steps, 1, t, noise, cond, uncond, guidance,
                                    prediction_type)
    for row in range(n):
        z = noise[row:row + 1]
        for step_t in scheduler.timesteps:
            if step_t == t[row]:
                break
            with torch.no_grad():
                out = teacher.unet(torch.cat([z, z]), step_t, encoder_hidden_states=torch.cat(
                    [uncond[row:row + 1], cond[row:row + 1]])).sample
            out_u, out_c = out.chunk(2)
            z = scheduler.step(out_u + guidance[row] * (out_c - out_u), step_t, z).prev_sample
        # fp32 rounding differs between a batch of 4 and a batch of 1 (kernel choice depends on the batch, and on
        # the torch version), and guidance up to 7.5 amplifies it over three steps: 2e-5 seen, 1e-4 allowed
        torch.testing.assert_close(got[row:row + 1], z, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[1], noise[1])  # the grid's first time is the noise itself


def test_trajectory_fraction_only_for_cfg_aware_and_progressive():
    assert MethodConfig(kind="progressive", trajectory_fraction=0.5).trajectory_fraction == 0.5
    with pytest.raises(ValidationError, match="trajectory_fraction is implemented for cfg_aware and progressive"):
        MethodConfig(kind="w_conditioned", trajectory_fraction=0.5)
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        MethodConfig(trajectory_fraction=1.5)


def test_one_default_whether_or_not_a_run_file_names_a_method():
    """A `method:` block that leaves trajectory_fraction out gets the same default as no block at all (it used to
    drop to 0 silently); kinds that do not implement trajectory states default to 0."""
    from sd_distill.distill.config import DistillParams
    from sd_distill.distill.methods.config import TRAJECTORY_FRACTION_DEFAULTS

    assert DistillParams().method == MethodConfig()
    from_file = DistillParams.model_validate({"method": {"kind": "cfg_aware", "teacher_steps": 16, "student_steps": 8}})
    assert from_file.method.trajectory_fraction == DistillParams().method.trajectory_fraction == 0.5
    assert TRAJECTORY_FRACTION_DEFAULTS["cfg_aware"] == 0.5
    for kind, extra in (("w_conditioned", {}), ("progressive", {}), ("bksdm_kd", {"student_arch": "bk-small"})):
        assert MethodConfig(kind=kind, **extra).trajectory_fraction == 0.0
    assert MethodConfig(trajectory_fraction=0.0).trajectory_fraction == 0.0  # SnapFusion's data states, explicitly
    assert MethodConfig().model_dump()["trajectory_fraction"] == 0.5  # stage keys see the number, not "unset"


def test_method_kinds_and_student_archs_are_listed_once():
    from typing import get_args

    from sd_distill.distill.methods.config import METHOD_KINDS, STUDENT_ARCHS

    assert METHOD_KINDS == get_args(MethodConfig.model_fields["kind"].annotation)
    assert STUDENT_ARCHS == get_args(MethodConfig.model_fields["student_arch"].annotation)
    with pytest.raises(ValidationError, match="cfg_aware"):
        MethodConfig(kind="consistency")
