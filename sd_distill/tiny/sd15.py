"""Stable Diffusion 1.5's architecture with random weights: full-size behaviour (memory, dtype handling, the real
component configs) without the real checkpoint.

The configs are those of the SD 1.5 pipeline's ``unet/config.json``, ``vae/config.json`` and
``text_encoder/config.json`` (CLIP ViT-L/14's text tower); only the tokenizer is the tiny test vocabulary (the
text encoder keeps CLIP's 49,408-token embedding, so parameter counts and memory are SD 1.5's).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import torch

from sd_distill.tiny.sd import ddim_scheduler, write_clip_tokenizer

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
CLIP_VIT_L14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)


def build_sd15_pipeline(folder: str | Path | None = None, *, words: Iterable[str] = (), seed: int = 0,
                        dtype: torch.dtype = torch.float32):
    """A ``StableDiffusionPipeline`` in SD 1.5's configuration with random weights (UNet 860M, VAE 84M, text
    encoder 123M parameters), saved to ``folder`` (safetensors) when given. The sample size is set by the caller
    at sampling time (height / width); the configs keep SD 1.5's 512 px."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # deferred: heavy (diffusers)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # deferred: heavy (transformers)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, words))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=ddim_scheduler("epsilon"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).to(dtype=dtype)
    if folder is not None:
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe
