"""Load a Stable Diffusion teacher (pipeline folder, hub id or ``toy:<name>``) and encode prompts with it.

The teacher's components are loaded one by one with the libraries' own ``from_pretrained`` (safetensors
preferred, offline unless downloads are allowed, see :mod:`sd_distill.modelref`). Bad input fails before any
weights load: a folder missing a component names it, an unknown ``prediction_type`` lists the valid ones, and an
SDXL pipeline (two text encoders, added time/text conditioning) is refused with what works instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sd_distill.diffusion.math import PREDICTION_TYPES
from sd_distill.diffusion.schedule import NoiseSchedule
from sd_distill.modelref import hub_kwargs, resolve_model_ref

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_MARKERS = ("text_encoder_2", "tokenizer_2")


@dataclass
class Teacher:
    unet: torch.nn.Module  # UNet2DConditionModel, frozen (requires_grad False, eval mode)
    vae: torch.nn.Module  # AutoencoderKL
    text_encoder: torch.nn.Module  # CLIPTextModel
    tokenizer: object  # CLIPTokenizer
    scheduler: object  # DDIMScheduler built from the teacher's scheduler config
    prediction_type: str  # "epsilon" | "sample" | "v_prediction"
    alphas_cumprod: Tensor  # [num_train_timesteps]
    schedule: NoiseSchedule  # alphas/sigmas + DDIM grid of the teacher's scheduler
    is_sdxl: bool = False  # SDXL pipelines are refused by load_teacher for now (see module docstring)
    ref: str = ""  # the reference it was loaded from (resolved path or hub id)
    scheduler_config: dict = field(default_factory=dict)  # the original scheduler config (copied into exports)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


def _model_index(ref: str) -> dict | None:
    """model_index.json of a local folder or a cached hub repo (None when it cannot be read offline)."""
    path = Path(ref)
    if path.is_dir():
        index = path / "model_index.json"
        return json.loads(index.read_text()) if index.exists() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(ref, "model_index.json", **hub_kwargs())).read_text())
    except Exception:
        return None


def check_teacher_folder(ref: str) -> dict:
    """Validate a teacher pipeline before loading weights; returns its model_index (may be empty for hub ids).

    Raises FileNotFoundError naming missing components, NotImplementedError for SDXL, ValueError for an unknown
    prediction type.
    """
    index = _model_index(ref)
    path = Path(ref)
    if path.is_dir():
        if index is None:
            raise FileNotFoundError(f"teacher folder {ref} has no model_index.json; expected a diffusers pipeline folder "
                                    f"with {list(REQUIRED_COMPONENTS)}")
        missing = [c for c in REQUIRED_COMPONENTS if not (path / c).is_dir() or index.get(c) in (None, [None, None])]
        if missing:
            raise FileNotFoundError(f"teacher folder {ref} is missing component(s) {missing}; a Stable Diffusion "
                                    f"pipeline needs {list(REQUIRED_COMPONENTS)}")
    index = index or {}
    if any(index.get(m) not in (None, [None, None]) for m in SDXL_MARKERS) or "XL" in str(index.get("_class_name", "")):
        raise NotImplementedError(
            f"teacher {ref} is an SDXL pipeline ({index.get('_class_name')}: two text encoders, added time/text "
            "conditioning). SDXL teachers are not supported yet; SD 1.x / 2.x pipelines (epsilon, sample or "
            "v_prediction), community fine-tunes of them and BK-SDM checkpoints work.")
    sched_cfg = _scheduler_config(ref)
    pred = sched_cfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ValueError(f"teacher {ref}: scheduler/scheduler_config.json has unknown prediction_type {pred!r}; "
                         f"valid: {list(PREDICTION_TYPES)}")
    return index


def _scheduler_config(ref: str) -> dict:
    path = Path(ref) / "scheduler" / "scheduler_config.json"
    if path.exists():
        return json.loads(path.read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(ref, "scheduler/scheduler_config.json", **hub_kwargs())).read_text())
    except Exception:
        return {}


def load_teacher(ref: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Teacher:
    """Load a Stable Diffusion teacher from a pipeline folder, hub id or ``toy:<name>``; all parts frozen."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    resolved = resolve_model_ref(ref)
    check_teacher_folder(resolved)
    kw = hub_kwargs()

    def load(component: str, loader):
        try:
            return loader(resolved, subfolder=component, **kw)
        except (OSError, EnvironmentError) as exc:
            raise FileNotFoundError(f"teacher {ref}: cannot load component {component!r} ({exc})") from exc

    unet = load("unet", UNet2DConditionModel.from_pretrained)
    vae = load("vae", AutoencoderKL.from_pretrained)
    text_encoder = load("text_encoder", CLIPTextModel.from_pretrained)
    tokenizer = load("tokenizer", CLIPTokenizer.from_pretrained)
    scheduler = load("scheduler", DDIMScheduler.from_pretrained)
    pred = scheduler.config.prediction_type
    if pred not in PREDICTION_TYPES:  # hub ids are only checked here
        raise ValueError(f"teacher {ref}: unknown prediction_type {pred!r}; valid: {list(PREDICTION_TYPES)}")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    return Teacher(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        prediction_type=pred, alphas_cumprod=scheduler.alphas_cumprod.float(),
        schedule=NoiseSchedule.from_scheduler(scheduler), is_sdxl=False, ref=resolved,
        scheduler_config=dict(_scheduler_config(resolved) or scheduler.config),
    )


@torch.no_grad()
def encode_prompts(teacher: Teacher, prompts: list[str]) -> Tensor:
    """CLIP text embeddings ``[B, L, D]`` (last hidden state, padded to the tokenizer's max length, as SD uses them).

    The negative / unconditional embedding is ``encode_prompts(teacher, [""])`` (or the negative prompt).
    """
    if isinstance(prompts, str):
        raise TypeError("encode_prompts takes a list of prompts, not a single string")
    tok = teacher.tokenizer(list(prompts), padding="max_length", max_length=teacher.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    device = next(teacher.text_encoder.parameters()).device
    return teacher.text_encoder(tok.input_ids.to(device))[0]
