"""Community teachers ship PNDM, Euler, DPM-Solver or LMS scheduler configs. None of them has DDIM's
``clip_sample``, so ``DDIMScheduler.from_config`` falls back to clipping x_hat to [-1, 1] -- in latent space,
where it is wrong. The teacher's scheduler and the exported student's must both say clip_sample=False and
thresholding=False, for SD and SDXL pipelines alike (``StableDiffusionXLPipeline`` does not reset it)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from sd_distill.distill.config import DistillParams
from sd_distill.distill.export import export_student
from sd_distill.distill.teacher import load_teacher

SCHEDULERS = ("PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "LMSDiscreteScheduler")
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


@pytest.fixture(scope="module")
def base_pipelines(tmp_path_factory):
    from sd_distill.tiny.sd import build_tiny_sd_pipeline
    from sd_distill.tiny.sdxl import build_tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("sched")
    build_tiny_sd_pipeline(root / "sd", unet_blocks=(16, 32), vae_blocks=(8, 16))
    build_tiny_sdxl_pipeline(root / "sdxl")
    return root


def _with_scheduler(base: Path, folder: Path, class_name: str) -> Path:
    """A copy of ``base`` whose scheduler is ``class_name`` as diffusers itself writes its config."""
    import diffusers

    shutil.copytree(base, folder)
    shutil.rmtree(folder / "scheduler")
    getattr(diffusers, class_name)(**SD_BETAS).save_pretrained(str(folder / "scheduler"))
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert "clip_sample" not in config  # the trap: DDIM's default (True) fills the gap
    return folder


def _finished_phase(teacher: Path, folder: Path) -> Path:
    """A phase folder in the trainer's output format, holding the teacher's UNet as the 'student'."""
    shutil.copytree(teacher / "unet", folder / "unet")
    (folder / "phase.json").write_text(json.dumps({"phase": {"index": 0, "name": "cfg-aware-16-8", "student_steps": 8},
                                                   "timestep_spacing": "trailing"}))
    with open(folder / "loss_curve.csv", "w", newline="") as f:
        csv.writer(f).writerows([["step", "loss", "lr"], [1, 0.5, 1e-5]])
    return folder


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("class_name", SCHEDULERS)
def test_teacher_and_exported_student_never_clip_latents(base_pipelines, tmp_path, kind, class_name):
    import diffusers

    teacher_dir = _with_scheduler(base_pipelines / kind, tmp_path / "teacher", class_name)
    teacher = load_teacher(str(teacher_dir))
    assert teacher.scheduler.config.clip_sample is False and teacher.scheduler.config.thresholding is False
    assert teacher.is_sdxl == (kind == "sdxl")

    params = DistillParams(teacher=str(teacher_dir))
    export_student(params, [_finished_phase(teacher_dir, tmp_path / "phase")], tmp_path / "student")
    saved = json.loads((tmp_path / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDIMScheduler"
    assert saved["clip_sample"] is False and saved["thresholding"] is False
    assert saved["timestep_spacing"] == "trailing" and saved["steps_offset"] == 1
    pipeline_class = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = pipeline_class.from_pretrained(str(tmp_path / "student"))
    assert pipe.scheduler.config.clip_sample is False
