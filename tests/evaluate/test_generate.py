"""Generation: DPM-Solver++ and DDIM on the trained grid, per-prompt seeds, UNet evaluation counts, resuming an interrupted run."""

import json

import numpy as np
import pytest
from PIL import Image

from sd_distill.evaluate.config import EvaluateParams, ModelSpec
from sd_distill.evaluate.generate import generate_images, generation_summary, load_pipeline
from sd_distill.evaluate.prompts import PromptSet
from sd_distill.evaluate.speed import measure_latency, speed_record, unet_macs_per_eval, unet_parameters

PROMPTS = PromptSet("coco", ["a red circle", "a blue square", "a green triangle", "a red square", "a"], kind="coco")


def _params(**kw):
    return EvaluateParams(resolution=32, batch_size=2, device="cpu", **kw)


def _pixels(folder, i):
    return np.asarray(Image.open(folder / f"{i:05d}.png"), dtype=np.int16)


def test_pipeline_uses_dpm_solver_pp_on_the_models_prediction_type(tiny_teacher):
    pipe = load_pipeline(str(tiny_teacher), device="cpu")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"


def test_resume_after_interruption_finishes_only_missing_batches(tmp_path, tiny_teacher):
    params, model = _params(), ModelSpec(name="teacher", ref=str(tiny_teacher))
    folder = generate_images(params, model, 3, PROMPTS, tmp_path, max_batches=1)  # "interrupted" after batch 0
    assert sorted(p.name for p in (folder / "_batches").iterdir()) == ["00000.json"]
    assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png"]
    with pytest.raises(RuntimeError, match="not finished"):
        generation_summary(folder)
    first_mtime = (folder / "00000.png").stat().st_mtime_ns
    calls = []
    generate_images(params, model, 3, PROMPTS, tmp_path, progress=lambda d, t, m: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]  # batches 1 and 2 only
    assert (folder / "00000.png").stat().st_mtime_ns == first_mtime
    assert len(list(folder.glob("*.png"))) == 5
    summary = generation_summary(folder)
    assert summary["images"] == 5 and summary["unet_evals_per_image"] == 2 * 3  # CFG: 2 evaluations per step

    # a rerun with everything done loads nothing and generates nothing
    calls.clear()
    generate_images(params, model, 3, PROMPTS, tmp_path, progress=lambda d, t, m: calls.append((d, t)))
    assert calls == []
    # other settings in the same folder are refused instead of mixed
    with pytest.raises(ValueError, match="guidance_scale"):
        generate_images(_params(guidance_scale=3.0), model, 3, PROMPTS, tmp_path)


def test_same_prompt_gets_the_same_noise_in_any_batch(tmp_path, tiny_teacher):
    model = ModelSpec(name="teacher", ref=str(tiny_teacher))
    a = generate_images(_params(), model, 2, PROMPTS, tmp_path / "a")
    b = generate_images(EvaluateParams(resolution=32, batch_size=5, device="cpu"), model, 2, PROMPTS, tmp_path / "b")
    for i in range(len(PROMPTS)):
        assert np.abs(_pixels(a, i) - _pixels(b, i)).max() <= 2  # batch composition changes only float round-off
    assert np.abs(_pixels(a, 0) - _pixels(a, 1)).mean() > 1  # different prompts/seeds differ
    one = PromptSet("coco", PROMPTS.prompts[:1], kind="coco")
    c = generate_images(_params(seed=1), model, 2, one, tmp_path / "c")
    assert np.abs(_pixels(a, 0) - _pixels(c, 0)).mean() > 1


def test_w_conditioned_student_runs_one_unet_evaluation_per_step(tmp_path, tiny_student):
    model = ModelSpec(name="student", ref=str(tiny_student), kind="student")
    folder = generate_images(_params(), model, 4, PROMPTS, tmp_path)
    assert generation_summary(folder)["unet_evals_per_image"] == 4
    meta = json.loads((folder / "generation.json").read_text())
    assert meta["fingerprint"]["steps"] == 4 and meta["fingerprint"]["prompts"] == 5


def test_speed_record_counts_evals_params_and_macs(tiny_teacher, tiny_student):
    teacher = load_pipeline(str(tiny_teacher), device="cpu")
    student = load_pipeline(str(tiny_student), device="cpu")
    t = speed_record(teacher, ["a red circle"], 5, 7.5, 32)
    s = speed_record(student, ["a red circle"], 5, 7.5, 32)
    assert t["unet_evals"] == 10 and s["unet_evals"] == 5
    assert t["unet_params_m"] == pytest.approx(unet_parameters(teacher.unet) / 1e6)
    assert s["unet_params_m"] < t["unet_params_m"]
    assert t["unet_gmacs_per_image"] == pytest.approx(10 * t["unet_gmacs_per_eval"])
    assert t["latency_s"] > 0
    # MACs grow with the latent area: 4x the pixels, about 4x the convolution work
    assert 3.0 < unet_macs_per_eval(teacher, 64) / unet_macs_per_eval(teacher, 32) <= 4.5
    assert measure_latency(teacher, ["a", "b"], 2, 1.0, 32)["unet_evals_per_image"] == 2  # guidance 1: no CFG


def test_generated_images_are_decoded_lazily_and_missing_ones_named(tmp_path):
    from sd_distill.evaluate.generate import LazyImages, load_images

    for i in range(3):
        Image.new("L", (4, 4), i * 50).save(tmp_path / f"{i:05d}.png")
    images = load_images(tmp_path, 3)
    assert isinstance(images, LazyImages) and len(images) == 3
    batch = images[1:3]
    assert [im.mode for im in batch] == ["RGB", "RGB"] and batch[1].getpixel((0, 0)) == (100, 100, 100)
    with pytest.raises(FileNotFoundError, match="1 generated images missing"):
        load_images(tmp_path, 4)


def test_ddim_sampler_steps_on_the_grid_the_student_was_distilled_on(tmp_path, tiny_student, tiny_teacher):
    import shutil

    from sd_distill.diffusion.schedule import NoiseSchedule

    student = tmp_path / "student"
    shutil.copytree(tiny_student, student)
    (student / "distill_config.json").write_text(json.dumps({"sampling": {"scheduler": "DDIMScheduler",
                                                                          "timestep_spacing": "trailing"}}))
    pipe = load_pipeline(str(student), device="cpu", sampler="ddim")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.scheduler.set_timesteps(8)
    trained = NoiseSchedule.from_scheduler(pipe.scheduler).with_spacing("trailing").timesteps(8)  # distill's grid
    assert pipe.scheduler.timesteps.tolist() == trained.tolist() == [999, 874, 749, 624, 499, 374, 249, 124]
    # a model without distill_config.json keeps its scheduler config's spacing
    teacher = load_pipeline(str(tiny_teacher), device="cpu", sampler="ddim")
    assert teacher.scheduler.config.timestep_spacing == load_pipeline(str(tiny_teacher)).scheduler.config.timestep_spacing
    with pytest.raises(ValueError, match="valid"):
        load_pipeline(str(tiny_teacher), device="cpu", sampler="euler")

    # DDIM images get their own folder and fingerprint; the same seeds, other images than DPM-Solver++'s
    params = _params()
    ddim = generate_images(params, ModelSpec(name="s", ref=str(student), sampler="ddim"), 4, PROMPTS, tmp_path / "im")
    dpm = generate_images(params, ModelSpec(name="s", ref=str(student)), 4, PROMPTS, tmp_path / "im")
    assert ddim.parent.name == "ddim-steps-4" and dpm.parent.name == "steps-4"
    assert json.loads((ddim / "generation.json").read_text())["fingerprint"]["sampler"] == "ddim"
    assert np.abs(_pixels(ddim, 0) - _pixels(dpm, 0)).max() > 0


def test_folders_from_before_samplers_were_recorded_resume_as_dpm_solver_pp(tmp_path, tiny_teacher):
    from sd_distill.evaluate.generate import _check_fingerprint, generation_fingerprint

    params, model = _params(), ModelSpec(name="teacher", ref=str(tiny_teacher))
    folder = generate_images(params, model, 2, PROMPTS, tmp_path, max_batches=1)
    meta = json.loads((folder / "generation.json").read_text())
    del meta["fingerprint"]["sampler"]  # as written before the sampler was part of the fingerprint
    (folder / "generation.json").write_text(json.dumps(meta))
    assert generation_summary(generate_images(params, model, 2, PROMPTS, tmp_path))["images"] == 5
    ddim = ModelSpec(name="teacher", ref=str(tiny_teacher), sampler="ddim")
    with pytest.raises(ValueError, match="sampler"):
        _check_fingerprint(folder, generation_fingerprint(params, ddim, 2, PROMPTS))
