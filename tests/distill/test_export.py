"""The exported student: a stock StableDiffusionPipeline folder with its config and loss curve."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sd_distill.distill.export import export_student
from sd_distill.distill.methods import plan_phases
from sd_distill.distill.trainer import train_phase
from tests._fixtures_distill import tiny_params


def _count_unet_calls(pipe):
    calls = []
    pipe.unet.register_forward_hook(lambda m, args, kwargs, out: calls.append((args[0].shape[0], kwargs.get("timestep_cond"))),
                                    with_kwargs=True)
    return calls


def test_exported_student_loads_in_a_stock_pipeline_and_samples(tiny_teacher, tiny_cache, tmp_path):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    params = tiny_params(tiny_teacher, max_steps=2)
    phase = plan_phases(params.method)[0]
    train_phase(params, phase, tiny_cache, tmp_path / "phase")
    out = export_student(params, [tmp_path / "phase"], tmp_path / "student")
    assert out["student_steps"] == 2 and out["w_conditioned"] is False and out["total_steps"] == 2

    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "student"))
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.prediction_type == "epsilon"
    calls = _count_unet_calls(pipe)
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=7.5, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert [c[0] for c in calls] == [2, 2]  # CFG: uncond + cond per step for a student without guidance embedding
    # the student UNet in the pipeline is the trained one, the rest is the teacher's
    from safetensors.torch import load_file

    s = load_file(str(tmp_path / "student" / "unet" / "diffusion_pytorch_model.safetensors"))
    p = load_file(str(tmp_path / "phase" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(s[k], p[k]) for k in p)
    v_s = load_file(str(tmp_path / "student" / "vae" / "diffusion_pytorch_model.safetensors"))
    v_t = load_file(str(tiny_teacher / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v_s[k], v_t[k]) for k in v_t)
    # the sampler grid is the one the student was trained on; DPM-Solver++ loads from the same config
    cfg = json.loads((tmp_path / "student" / "distill_config.json").read_text())
    assert cfg["sampling"]["timestep_spacing"] == pipe.scheduler.config.timestep_spacing == phase_spacing(tmp_path)
    assert cfg["phases"][0]["phase"]["name"] == phase.name and cfg["params"]["teacher"] == str(tiny_teacher)
    assert cfg["prediction_type"] == "epsilon" and "w = s - 1" in cfg["guidance_convention"]
    assert cfg["guidance_range"] == [2.0, 14.0]  # the method's guidance_min / guidance_max
    assert cfg["sampling"]["guidance_scale_example"] == 8.0  # from that range, not a constant
    dpm = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert dpm.config.prediction_type == "epsilon"
    assert (tmp_path / "student" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "student" / "loss_curve.csv").read_text().splitlines()
    assert rows[0].startswith("phase,phase_name,global_step,step,loss") and len(rows) == 3
    # the model card, in the hub's format: a local teacher is no base_model, the sampling settings are the config's
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "student" / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image" and card.data.base_model is None
    assert f"num_inference_steps=2, guidance_scale={cfg['sampling']['guidance_scale_example']}" in card.text
    assert f'timestep_spacing="{phase_spacing(tmp_path)}"' in card.text and "Not evaluated yet" in card.text


def test_trained_guidance_range_comes_from_the_method_config(tmp_path):
    from sd_distill.distill.export import example_guidance, student_guidance_range, trained_guidance_range
    from sd_distill.distill.methods import MethodConfig

    narrow = MethodConfig(guidance_min=3.0, guidance_max=5.0)
    assert trained_guidance_range(narrow) == (3.0, 5.0) and example_guidance((3.0, 5.0)) == 4.0
    assert trained_guidance_range(MethodConfig(kind="bksdm_kd", student_arch="bk-small")) is None
    assert example_guidance(None) is None
    assert student_guidance_range(tmp_path) is None  # no distill_config.json
    (tmp_path / "distill_config.json").write_text(json.dumps({"guidance_range": [3.0, 5.0]}))
    assert student_guidance_range(tmp_path) == (3.0, 5.0)


def test_evaluating_a_student_outside_its_trained_guidance_range_is_noted(tmp_path):
    from sd_distill.evaluate.config import ModelSpec
    from sd_distill.evaluate.guidance import guidance_outside_training

    (tmp_path / "distill_config.json").write_text(json.dumps({"guidance_range": [2.0, 6.0]}))
    student = ModelSpec(name="student", ref=str(tmp_path), kind="student")
    note = guidance_outside_training(student, 7.5)
    assert "outside the range it was distilled on [2, 6]" in note and note.startswith("student ")
    assert guidance_outside_training(student, 6.0) is None
    assert guidance_outside_training(ModelSpec(name="teacher", ref="toy:sd"), 7.5) is None


def phase_spacing(tmp_path):
    return json.loads((tmp_path / "phase" / "phase.json").read_text())["timestep_spacing"]


def test_export_refuses_an_unfinished_phase(tiny_teacher, tmp_path):
    (tmp_path / "phase").mkdir()
    with pytest.raises(FileNotFoundError, match="not a finished distillation phase"):
        export_student(tiny_params(tiny_teacher), [tmp_path / "phase"], tmp_path / "student")


@pytest.mark.slow
def test_w_conditioned_chain_runs_end_to_end_and_the_stock_pipeline_feeds_guidance_minus_one(
    tiny_teacher, tiny_curated, tmp_path
):
    from diffusers import StableDiffusionPipeline

    from sd_distill.diffusion.math import guidance_embedding
    from sd_distill.distill.run import distill

    method = {"kind": "w_conditioned", "progressive_start_steps": 4, "student_steps": 2, "w_embed_dim": 16}
    params = tiny_params(tiny_teacher, method=method, max_steps=2)
    result = distill(params, tiny_curated, tmp_path / "run")
    names = [p["phase"]["name"] for p in result["phases"]]
    assert names == ["w-stage1-4", "halving-4-2"]
    assert (tmp_path / "run" / "phase-01-halving-4-2" / "unet").is_dir()
    assert result["export"]["w_conditioned"] is True and result["export"]["total_steps"] == 4
    cfg = json.loads((tmp_path / "run" / "student" / "distill_config.json").read_text())
    assert cfg["time_cond_proj_dim"] == 16 and cfg["sampling"]["unet_evals_per_step"] == 1

    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "run" / "student"))
    calls = _count_unet_calls(pipe)
    pipe("a red circle", num_inference_steps=2, guidance_scale=7.5, height=32, width=32, output_type="np")
    assert [c[0] for c in calls] == [1, 1]  # one evaluation per step: guidance comes through the embedding
    torch.testing.assert_close(calls[0][1], guidance_embedding(torch.tensor([6.5]), 16))
    # a second call reuses the cache instead of re-encoding
    again = distill(params, tiny_curated, tmp_path / "run")
    assert again["cache"] == {"reused": str(tmp_path / "run" / "cache")}
    assert all(p["steps_this_run"] == 0 for p in again["phases"])
