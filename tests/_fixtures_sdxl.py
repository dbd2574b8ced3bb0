"""Shared fixtures for the SDXL tests: tiny SDXL teachers (epsilon and v_prediction) saved as real
``StableDiffusionXLPipeline`` folders and loaded back through ``load_teacher``, their UNets briefly pre-trained so
the samplers have structure; a tiny training batch in the trainer's SDXL format.

Import the fixtures you use into the test module (``from tests._fixtures_sdxl import sdxl_teachers, ...``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from tests._fixtures_methods import pretrain_unet

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SDXL_PREDICTION_TYPES = ("epsilon", "v_prediction")
WORDS = ["cat", "dog", "red", "blue", "circle", "square", "green", "a", "on", "white", "black", "background"]
PROMPTS = ["a red cat", "a blue dog"]
RESOLUTION = 32  # pixels; 8x8 latents (VAE /4)

_FOLDERS: dict[str, Path] = {}
_TEACHERS: dict[str, object] = {}


def pretrain_sdxl_unet(unet, prediction_type: str, cond, uncond, steps: int = 120, lr: float = 2e-3, seed: int = 0):
    """The SD teachers' short denoising pre-training (``pretrain_unet``), fed through the TextCond path the
    methods use."""
    from sd_distill.distill.textcond import accept_text_cond

    accept_text_cond(unet)
    return pretrain_unet(unet, prediction_type, cond, uncond, steps=steps, lr=lr, seed=seed)


def sdxl_teacher_folder(root: Path, prediction_type: str) -> Path:
    """A tiny SDXL pipeline folder of ``prediction_type`` whose UNet is briefly pre-trained for that type."""
    from sd_distill.distill.teacher import encode_negative, encode_prompts, load_teacher
    from sd_distill.tiny.sd import ddim_scheduler
    from sd_distill.tiny.sdxl import build_tiny_sdxl_pipeline

    if prediction_type in _FOLDERS:
        return _FOLDERS[prediction_type]
    base = root / "sdxl-base"
    if not base.exists():
        build_tiny_sdxl_pipeline(base, words=WORDS, image_size=RESOLUTION)
    raw = load_teacher(str(base))
    cond, uncond = encode_prompts(raw, PROMPTS), encode_negative(raw)
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(base), add_watermarker=False)
    pipe.unet = pretrain_sdxl_unet(copy.deepcopy(pipe.unet), prediction_type, cond, uncond)
    pipe.scheduler = ddim_scheduler(prediction_type)
    folder = root / f"sdxl-{prediction_type}"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _FOLDERS[prediction_type] = folder
    return folder


@pytest.fixture(scope="session")
def sdxl_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sdxl-teachers")


@pytest.fixture(scope="session")
def sdxl_teachers(sdxl_root):
    """A function prediction_type -> loaded Teacher (cached per session)."""
    from sd_distill.distill.teacher import load_teacher

    def load(prediction_type: str):
        if prediction_type not in _TEACHERS:
            _TEACHERS[prediction_type] = load_teacher(str(sdxl_teacher_folder(sdxl_root, prediction_type)))
        return _TEACHERS[prediction_type]

    return load


def sdxl_batch(teacher, seed: int = 0) -> dict:
    """A fixed training batch in the trainer's SDXL format (what ``LatentDataset.batch`` yields)."""
    from sd_distill.distill.teacher import encode_negative, encode_prompts

    cond, uncond = encode_prompts(teacher, PROMPTS), encode_negative(teacher)
    size = teacher.unet.config.sample_size
    return {"latents": torch.randn(len(PROMPTS), 4, size, size, generator=torch.Generator().manual_seed(seed)),
            "prompt_embeds": cond.hidden, "pooled_prompt_embeds": cond.pooled, "time_ids": cond.time_ids,
            "negative_embeds": uncond.hidden, "negative_pooled_embeds": uncond.pooled}
