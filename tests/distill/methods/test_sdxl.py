"""SDXL teachers: the tiny SDXL pipeline, the TextCond conditioning path (checked against diffusers' own
StableDiffusionXLPipeline), the step-distillation gap test for cfg_aware / progressive / w_conditioned (epsilon and
v_prediction teachers), and the refusals (block-removed SDXL students)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sd_distill.distill.methods import MethodConfig, make_student, plan_phases
from sd_distill.distill.textcond import TextCond, unet_kwargs
from tests._fixtures_methods import run_phases, step_gap
from tests._fixtures_sdxl import PROMPTS, RESOLUTION, SDXL_PREDICTION_TYPES, sdxl_batch

N = 1  # student steps; the teacher reference runs 2N
GUIDANCE = 5.0  # the guidance scale s trained and evaluated (diffusers form)
STEPS, LR = 60, 1e-4  # Adam steps per phase and learning rate (the SD methods test's values)
W_STEPS, W_LR = 100, 1e-4  # w_conditioned, epsilon teacher: half the SD methods test's steps (SDXL steps cost more)


def _stock_pipeline(teacher):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(teacher.ref, scheduler=DDIMScheduler.from_pretrained(
        teacher.ref, subfolder="scheduler"), add_watermarker=False)


def test_tiny_sdxl_pipeline_has_sdxl_architecture_and_loads_as_an_sdxl_teacher(sdxl_teachers):
    teacher = sdxl_teachers("epsilon")
    unet = teacher.unet.config
    assert teacher.is_sdxl and type(teacher.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert unet.addition_embed_type == "text_time" and unet.cross_attention_dim == teacher.text_dim == 64
    assert unet.projection_class_embeddings_input_dim == 32 + 6 * unet.addition_time_embed_dim
    assert teacher.vae.config.scaling_factor == 0.13025 and teacher.vae.config.force_upcast
    assert teacher.force_zeros_for_empty_prompt
    index = json.loads((teacher.ref and open(f"{teacher.ref}/model_index.json").read()))
    assert index["_class_name"] == "StableDiffusionXLPipeline"


def test_text_side_equals_the_stock_sdxl_pipelines_encode_prompt(sdxl_teachers):
    from sd_distill.distill.teacher import encode_negative, encode_prompts

    teacher = sdxl_teachers("epsilon")
    pipe = _stock_pipeline(teacher)
    with torch.no_grad():
        hidden, neg_hidden, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
        pipe_time_ids = pipe._get_add_time_ids((RESOLUTION, RESOLUTION), (0, 0), (RESOLUTION, RESOLUTION),
                                               dtype=hidden.dtype, text_encoder_projection_dim=32)
    cond, uncond = encode_prompts(teacher, PROMPTS), encode_negative(teacher)
    torch.testing.assert_close(cond.hidden, hidden)
    torch.testing.assert_close(cond.pooled, pooled)
    torch.testing.assert_close(cond.time_ids, pipe_time_ids.expand(2, -1))
    assert uncond.hidden.abs().sum() == 0 and uncond.pooled.abs().sum() == 0  # force_zeros_for_empty_prompt
    torch.testing.assert_close(uncond.hidden, neg_hidden[:1])
    torch.testing.assert_close(uncond.pooled, neg_pooled[:1])
    # an explicit negative prompt is encoded, as the pipeline does for a non-empty negative_prompt
    assert encode_negative(teacher, "blue").hidden.abs().sum() > 0


def test_text_cond_concatenates_selects_and_expands_every_part_row_wise():
    a = TextCond(torch.zeros(1, 3, 4), torch.zeros(1, 2), torch.zeros(1, 6))
    b = TextCond(torch.ones(2, 3, 4), torch.ones(2, 2), torch.full((2, 6), 32.0))
    both = torch.cat([a.expand(2), b])
    assert both.shape == (4, 3, 4) and both.pooled.shape == (4, 2) and both.time_ids[:, 0].tolist() == [0, 0, 32, 32]
    picked = torch.where(torch.tensor([True, False]).reshape(-1, 1, 1), a.expand(2), b)
    assert picked.pooled[:, 0].tolist() == [0.0, 1.0] and picked.hidden[:, 0, 0].tolist() == [0.0, 1.0]
    assert [c.shape[0] for c in both.chunk(2)] == [2, 2]
    kwargs = unet_kwargs(b)
    assert set(kwargs) == {"encoder_hidden_states", "added_cond_kwargs"} and kwargs["added_cond_kwargs"]["time_ids"] is b.time_ids
    assert unet_kwargs(b.hidden) == {"encoder_hidden_states": b.hidden}
    with pytest.raises(ValueError, match="both pooled and time_ids"):
        TextCond(torch.zeros(1, 3, 4), torch.zeros(1, 2))
    with pytest.raises(TypeError, match="mixes TextCond and plain tensors"):
        torch.cat([a, torch.zeros(1, 3, 4)])


@pytest.mark.parametrize("prediction_type", SDXL_PREDICTION_TYPES)
def test_guided_ddim_through_text_cond_matches_the_stock_sdxl_pipeline(sdxl_teachers, prediction_type):
    from sd_distill.diffusion.sampling import ddim_sample
    from sd_distill.distill.teacher import encode_negative, encode_prompts
    from sd_distill.distill.textcond import accept_text_cond

    teacher = sdxl_teachers(prediction_type)
    pipe = _stock_pipeline(teacher)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = ddim_sample(accept_text_cond(teacher.unet), teacher.scheduler, z, encode_prompts(teacher, PROMPTS),
                       encode_negative(teacher), 3, 7.5, prediction_type)
    theirs = pipe(PROMPTS, num_inference_steps=3, guidance_scale=7.5, latents=z.clone(), height=RESOLUTION,
                  width=RESOLUTION, output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("prediction_type, kind", [("epsilon", "cfg_aware"), ("v_prediction", "cfg_aware"),
                                                   ("epsilon", "progressive"),  # one progressive halving == k = 2
                                                   ("epsilon", "w_conditioned")])
def test_sdxl_student_n_steps_lands_closer_to_guided_teacher_2n_than_teacher_n(sdxl_teachers, kind, prediction_type):
    teacher = sdxl_teachers(prediction_type)
    batch = sdxl_batch(teacher)
    cfg = MethodConfig(kind=kind, teacher_steps=2 * N, student_steps=N, progressive_start_steps=2 * N,
                       guidance_min=GUIDANCE, guidance_max=GUIDANCE, w_embed_dim=16, trajectory_fraction=0.0)
    steps, lr = (W_STEPS, W_LR) if kind == "w_conditioned" else (STEPS, LR)
    method = run_phases(cfg, teacher, batch, steps, lr)
    gap = step_gap(teacher, method, batch, GUIDANCE, N)  # mean over 11 noise draws
    assert gap["student"] < 0.9 * gap["teacher_n"], gap


def test_sdxl_folder_missing_its_second_text_encoder_names_it(sdxl_teachers, tmp_path):
    import shutil

    from sd_distill.distill.teacher import load_teacher

    broken = tmp_path / "xl"
    shutil.copytree(sdxl_teachers("epsilon").ref, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"missing component\(s\) \['text_encoder_2'\]; an SDXL pipeline"):
        load_teacher(str(broken))
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    shutil.copytree(sdxl_teachers("epsilon").ref + "/text_encoder_2", broken / "text_encoder_2")
    with pytest.raises(ValueError, match="StableDiffusionXLImg2ImgPipeline.*text-to-image StableDiffusionXLPipeline"):
        load_teacher(str(broken))


def test_block_removed_student_of_an_sdxl_teacher_is_refused(sdxl_teachers):
    teacher = sdxl_teachers("epsilon")
    cfg = MethodConfig(kind="bksdm_kd", student_arch="bk-small", student_steps=2)
    with pytest.raises(ValueError, match="not supported for SDXL teachers.*student_arch='same'"):
        make_student(cfg, teacher.unet, plan_phases(cfg)[0])


def test_w_conditioned_sdxl_student_takes_the_guidance_embedding(sdxl_teachers):
    """w_conditioned works with SDXL: time_cond_proj_dim sits on the time embedding, beside the text_time one."""
    from sd_distill.distill.methods import build_method

    teacher = sdxl_teachers("epsilon")
    batch = sdxl_batch(teacher)
    cfg = MethodConfig(kind="w_conditioned", progressive_start_steps=2, student_steps=1, w_embed_dim=16,
                       guidance_min=GUIDANCE, guidance_max=GUIDANCE)
    phase = plan_phases(cfg)[0]
    student = make_student(cfg, teacher.unet, phase)
    assert student.config.time_cond_proj_dim == 16 and student.config.addition_embed_type == "text_time"
    method = build_method(cfg, phase, teacher, teacher.unet, student)
    loss, logs = method.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and student.time_embedding.cond_proj.weight.grad.abs().sum() > 0


def _sdxl_params(teacher_ref: str, method: dict | None = None, **trainer):
    from sd_distill.distill.config import DistillParams

    t = dict(max_steps=2, batch_size=2, checkpoint_every=2, log_every=1, device="cpu", lr=1e-4)
    t.update(trainer)
    return DistillParams.model_validate({
        "teacher": teacher_ref, "method": method or {"kind": "cfg_aware", "teacher_steps": 4, "student_steps": 2},
        "trainer": t, "data": {"resolution": RESOLUTION, "cache_dtype": "float32", "cache_batch_size": 4}})


def test_cache_step_refuses_a_block_removed_student_for_an_sdxl_teacher_before_encoding(sdxl_teachers, tmp_path):
    from sd_distill.distill.data import cache_latents
    from tests._fixtures_distill import write_tiny_curated

    params = _sdxl_params(sdxl_teachers("epsilon").ref, {"kind": "bksdm_kd", "student_arch": "bk-tiny"})
    with pytest.raises(ValueError, match="bk-tiny.*not supported for SDXL"):
        cache_latents(params, write_tiny_curated(tmp_path / "curated", n=2), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_sdxl_distill_exports_a_stock_sdxl_pipeline_that_evaluate_scores(
        sdxl_teachers, tmp_path, coco_fixture, hpsv2_fixture, tiny_classifier_folder, tiny_clip_folder):
    from diffusers import StableDiffusionXLPipeline

    from sd_distill.distill.data import LatentDataset
    from sd_distill.distill.run import distill
    from sd_distill.distill.teacher import encode_prompts
    from sd_distill.evaluate import EvaluateParams, ModelSpec, evaluate
    from tests._fixtures_distill import CAPTIONS, write_tiny_curated

    teacher = sdxl_teachers("v_prediction")
    params = _sdxl_params(teacher.ref)
    result = distill(params, write_tiny_curated(tmp_path / "curated", n=6), tmp_path / "run")
    assert result["export"]["prediction_type"] == "v_prediction" and result["export"]["total_steps"] == 2

    # the cache holds SDXL's added conditioning: pooled embeds and time ids (R, R, 0, 0, R, R)
    data = LatentDataset(tmp_path / "run" / "cache")
    assert data.index["sdxl"]["time_ids"] == [32, 32, 0, 0, 32, 32]
    batch = data.batch([0, 1])
    assert batch["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    assert batch["negative_pooled_embeds"].abs().sum() == 0  # SDXL base's force_zeros_for_empty_prompt
    text = encode_prompts(teacher, [CAPTIONS[0]])
    torch.testing.assert_close(data.batch([0])["pooled_prompt_embeds"], text.pooled)  # row 0 is caption 0
    torch.testing.assert_close(data.batch([0])["prompt_embeds"], text.hidden)

    # a stock StableDiffusionXLPipeline loads the student and samples it with CFG at guidance 7.5
    student_dir = tmp_path / "run" / "student"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(student_dir))
    rows = []
    pipe.unet.register_forward_pre_hook(lambda m, a, kw: rows.append(a[0].shape[0]), with_kwargs=True)
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=7.5, height=RESOLUTION, width=RESOLUTION,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(image).all() and rows == [2, 2]
    config = json.loads((student_dir / "distill_config.json").read_text())
    assert config["pipeline"] == "StableDiffusionXLPipeline" and config["prediction_type"] == "v_prediction"
    assert json.loads((student_dir / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True

    # the existing evaluate() scores teacher and student on toy prompts with the same seeds-per-prompt contract
    captions, _ = coco_fixture
    eval_params = EvaluateParams(
        steps=[2], resolution=RESOLUTION, batch_size=4, device="cpu", coco_captions=str(captions), max_coco_prompts=3,
        hpsv2_benchmark=str(hpsv2_fixture), max_prompts_per_style=1, feature_extractor=str(tiny_classifier_folder),
        hps_scorer=str(tiny_clip_folder), hps_versions=["v2.1"], clip_model=str(tiny_clip_folder), is_splits=1,
        grid_prompts=2, latency_images=1)
    models = [ModelSpec(name="teacher", ref=teacher.ref), ModelSpec(name="student", ref=str(student_dir), kind="student")]
    summary = evaluate(eval_params, models, tmp_path / "eval")
    records = {r["model"]: r for r in summary["records"]}
    for name in ("teacher", "student"):
        r = records[name]
        assert r["unet_evals"] == r["generated_unet_evals"] == 4  # 2 steps x CFG
        assert r["fid"] > 0 and r["unet_gmacs_per_eval"] > 0 and 0 <= r["clip"] <= 100
    assert records["teacher"]["unet_params_m"] == records["student"]["unet_params_m"]
    coco = tmp_path / "eval" / "images" / "student" / "steps-2" / "coco"
    assert sorted(p.name for p in coco.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
