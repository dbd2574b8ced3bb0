"""Load a Stable Diffusion teacher (pipeline folder, hub id or ``toy:<name>``) and encode prompts with it.

The teacher's components are loaded one by one with the libraries' own ``from_pretrained`` (safetensors
preferred, offline unless downloads are allowed, see :mod:`sd_distill.modelref`). Bad input fails before any
weights load: a folder missing a component names it, an unknown ``prediction_type`` lists the valid ones.

SD 1.x / 2.x: one CLIP text encoder; the UNet's text input is its last hidden state [B, 77, D].
SDXL (``StableDiffusionXLPipeline``, detected from model_index.json's ``_class_name`` / ``text_encoder_2`` or the
UNet's ``addition_embed_type="text_time"``): two encoders (CLIPTextModel + CLIPTextModelWithProjection); the text
side is a :class:`~sd_distill.distill.textcond.TextCond` built as diffusers' ``StableDiffusionXLPipeline.
encode_prompt`` builds it: hidden = concat(penultimate hidden states of both encoders), pooled = encoder 2's
projected pooled output, time ids = (R, R, 0, 0, R, R) -- the pipeline's default micro-conditioning
(original size = target size = the resolution R, no crop), which is what the student is later sampled with.
The empty negative prompt is all zeros when the pipeline's ``force_zeros_for_empty_prompt`` is set (SDXL base),
again as the stock pipeline does for ``negative_prompt=None``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from sd_distill.diffusion.math import PREDICTION_TYPES
from sd_distill.diffusion.schedule import LATENT_DDIM_OVERRIDES, NoiseSchedule
from sd_distill.distill.textcond import TextCond
from sd_distill.modelref import hub_kwargs, resolve_model_ref

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_MARKERS = ("text_encoder_2", "tokenizer_2")
SDXL_COMPONENTS = REQUIRED_COMPONENTS + SDXL_MARKERS


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
    is_sdxl: bool = False  # StableDiffusionXLPipeline: two text encoders, added text/time conditioning
    ref: str = ""  # the reference it was loaded from (resolved path or hub id)
    scheduler_config: dict = field(default_factory=dict)  # the original scheduler config (copied into exports)
    text_encoder_2: Optional[torch.nn.Module] = None  # SDXL: CLIPTextModelWithProjection (pooled output)
    tokenizer_2: object = None  # SDXL: its CLIPTokenizer
    force_zeros_for_empty_prompt: bool = False  # SDXL pipeline config: the empty negative prompt is all zeros

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def text_dim(self) -> int:
        """Width of the UNet's text input (cross_attention_dim): the sum of both encoders' widths for SDXL."""
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        return sum(int(e.config.hidden_size) for e in encoders)


def is_sdxl_index(index: dict | None) -> bool:
    """model_index.json of an SDXL pipeline (second text encoder / tokenizer, or an XL pipeline class)."""
    index = index or {}
    has_second_encoder = any(index.get(m) not in (None, [None, None]) for m in SDXL_MARKERS)
    return has_second_encoder or "XL" in str(index.get("_class_name", ""))


def read_model_index(ref: str) -> dict | None:
    """model_index.json of a local folder or a cached hub repo (None when it cannot be read offline)."""
    path = Path(ref)
    if path.is_dir():
        index = path / "model_index.json"
        return json.loads(index.read_text()) if index.exists() else None
    try:
        from huggingface_hub import hf_hub_download  # deferred: heavy (huggingface_hub)

        return json.loads(Path(hf_hub_download(ref, "model_index.json", **hub_kwargs())).read_text())
    except Exception:
        return None


def check_teacher_folder(ref: str) -> dict:
    """Validate a teacher pipeline before loading weights; returns its model_index (may be empty for hub ids).

    Raises FileNotFoundError naming missing components (SDXL needs ``text_encoder_2`` / ``tokenizer_2`` too),
    ValueError for an unknown prediction type or an SDXL pipeline class this module does not handle.
    """
    index = read_model_index(ref)
    path = Path(ref)
    sdxl = is_sdxl_index(index)
    required = SDXL_COMPONENTS if sdxl else REQUIRED_COMPONENTS
    if path.is_dir():
        if index is None:
            raise FileNotFoundError(f"teacher folder {ref} has no model_index.json; expected a diffusers pipeline folder "
                                    f"with {list(REQUIRED_COMPONENTS)}")
        missing = [c for c in required if not (path / c).is_dir() or index.get(c) in (None, [None, None])]
        if missing:
            kind = "an SDXL" if sdxl else "a Stable Diffusion"
            raise FileNotFoundError(f"teacher folder {ref} is missing component(s) {missing}; {kind} "
                                    f"pipeline needs {list(required)}")
    index = index or {}
    name = str(index.get("_class_name", ""))
    if sdxl and name not in ("", "StableDiffusionXLPipeline"):
        raise ValueError(f"teacher {ref} is a {name}; SDXL teachers must be text-to-image StableDiffusionXLPipeline "
                         "folders (the refiner / img2img / inpainting variants are not distillation teachers here)")
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
        from huggingface_hub import hf_hub_download  # deferred: heavy (huggingface_hub)

        return json.loads(Path(hf_hub_download(ref, "scheduler/scheduler_config.json", **hub_kwargs())).read_text())
    except Exception:
        return {}


def load_teacher(ref: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Teacher:
    """Load a Stable Diffusion (1.x / 2.x / XL) teacher from a pipeline folder, hub id or ``toy:<name>``; all parts
    frozen. A VAE with ``force_upcast`` (SDXL's, which overflows in fp16) stays in fp32 when ``dtype`` is fp16."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # deferred: heavy (diffusers)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # deferred: heavy (transformers)

    resolved = resolve_model_ref(ref)
    index = check_teacher_folder(resolved)
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
    scheduler = load("scheduler", lambda *a, **k: DDIMScheduler.from_pretrained(*a, **k, **LATENT_DDIM_OVERRIDES))
    pred = scheduler.config.prediction_type
    if pred not in PREDICTION_TYPES:  # hub ids are only checked here
        raise ValueError(f"teacher {ref}: unknown prediction_type {pred!r}; valid: {list(PREDICTION_TYPES)}")
    sdxl = is_sdxl_index(index) or unet.config.get("addition_embed_type") == "text_time"
    text_encoder_2 = tokenizer_2 = None
    if sdxl:
        if unet.config.get("addition_embed_type") != "text_time":
            raise ValueError(f"teacher {ref}: an SDXL pipeline whose unet has addition_embed_type "
                             f"{unet.config.get('addition_embed_type')!r}; expected 'text_time'")
        text_encoder_2 = load("text_encoder_2", CLIPTextModelWithProjection.from_pretrained)
        tokenizer_2 = load("tokenizer_2", CLIPTokenizer.from_pretrained)
    for module in (unet, text_encoder, text_encoder_2):
        if module is not None:
            module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    upcast = dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
    vae.requires_grad_(False).eval().to(device=device, dtype=torch.float32 if upcast else dtype)
    return Teacher(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        prediction_type=pred, alphas_cumprod=scheduler.alphas_cumprod.float(),
        schedule=NoiseSchedule.from_scheduler(scheduler), is_sdxl=sdxl, ref=resolved,
        scheduler_config=dict(_scheduler_config(resolved) or scheduler.config),
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        force_zeros_for_empty_prompt=sdxl and bool((index or {}).get("force_zeros_for_empty_prompt", True)),
    )


def _token_ids(tokenizer, prompts: list[str], device) -> Tensor:
    tok = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return tok.input_ids.to(device)


@torch.no_grad()
def encode_prompts(teacher: Teacher, prompts: list[str], resolution: Optional[int] = None) -> Tensor | TextCond:
    """The UNet's text input for ``prompts``, padded to the tokenizers' max length, as the stock pipelines build it.

    SD 1.x / 2.x: the CLIP last hidden state ``[B, L, D]``. SDXL: a ``TextCond`` (hidden [B, L, D1 + D2],
    pooled [B, P], time ids [B, 6] for ``resolution``, default the teacher's native one; see the module docstring).
    The negative / unconditional input is :func:`encode_negative`.
    """
    if isinstance(prompts, str):
        raise TypeError("encode_prompts takes a list of prompts, not a single string")
    device = next(teacher.text_encoder.parameters()).device
    if not teacher.is_sdxl:
        return teacher.text_encoder(_token_ids(teacher.tokenizer, prompts, device))[0]
    hidden = []
    pairs = ((teacher.tokenizer, teacher.text_encoder), (teacher.tokenizer_2, teacher.text_encoder_2))
    for tokenizer, encoder in pairs:
        out = encoder(_token_ids(tokenizer, prompts, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # SDXL reads the penultimate layer of both encoders
    pooled = out.text_embeds  # encoder 2's projected pooled output
    return TextCond(torch.cat(hidden, dim=-1), pooled, sdxl_time_ids(teacher, len(prompts), resolution, pooled))


def encode_negative(teacher: Teacher, negative_prompt: str = "", resolution: Optional[int] = None) -> Tensor | TextCond:
    """The unconditional text input of CFG (one row): the encoded negative prompt, or for SDXL with
    ``force_zeros_for_empty_prompt`` and an empty negative prompt all zeros (the stock pipeline's default)."""
    encoded = encode_prompts(teacher, [negative_prompt], resolution)
    if teacher.is_sdxl and teacher.force_zeros_for_empty_prompt and negative_prompt == "":
        return TextCond(torch.zeros_like(encoded.hidden), torch.zeros_like(encoded.pooled), encoded.time_ids)
    return encoded


def native_resolution(teacher) -> int:
    """The teacher's training resolution: UNet sample_size x the VAE's downsampling factor."""
    factor = 2 ** (len(teacher.vae.config.block_out_channels) - 1)
    return int(teacher.unet.config.sample_size) * factor


def sdxl_time_ids(teacher: Teacher, n: int, resolution: Optional[int] = None, like: Optional[Tensor] = None) -> Tensor:
    """SDXL micro-conditioning ``[n, 6]`` = (original h, w, crop top, left, target h, w) = (R, R, 0, 0, R, R)."""
    r = float(resolution or native_resolution(teacher))
    ids = torch.tensor([[r, r, 0.0, 0.0, r, r]])
    if like is not None:
        ids = ids.to(device=like.device, dtype=like.dtype)
    return ids.expand(n, -1).contiguous()
