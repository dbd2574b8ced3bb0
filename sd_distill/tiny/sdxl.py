"""Tiny Stable Diffusion XL pipelines in the real diffusers architectures.

The same classes as SDXL base (``StableDiffusionXLPipeline``: UNet2DConditionModel with ``addition_embed_type=
"text_time"``, AutoencoderKL, CLIPTextModel + CLIPTextModelWithProjection, two CLIPTokenizers, a DDIMScheduler on
SD's noise schedule), a few hundred thousand parameters, saved with ``save_pretrained`` and loaded back through
the code paths real checkpoints use. Nothing here is downloaded.

How the pieces fit (SDXL, Podell et al. 2023, sec. 2.1-2.2; diffusers' ``StableDiffusionXLPipeline``):
  * ``encoder_hidden_states`` = concat(penultimate hidden state of encoder 1, of encoder 2) along the feature
    axis, so the UNet's ``cross_attention_dim`` = hidden_1 + hidden_2 (768 + 1280 = 2048 in SDXL base);
  * the added embedding sees concat(pooled projection of encoder 2, Fourier features of the six time ids
    (original size, crop top-left, target size)), so ``projection_class_embeddings_input_dim`` =
    projection_dim_2 + 6 x ``addition_time_embed_dim`` (1280 + 6 x 256 = 2816 in SDXL base).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch

from sd_distill.tiny.sd import ddim_scheduler, tiny_clip_text_config, tiny_vae, write_clip_tokenizer

NUM_TIME_IDS = 6  # (original h, original w, crop top, crop left, target h, target w)
SDXL_VAE_SCALING = 0.13025  # SDXL base's VAE scaling_factor (SD 1.x / 2.x use 0.18215)


def tiny_sdxl_unet(
    *,
    text_hidden: tuple[int, int] = (32, 32),
    pooled_dim: int = 32,
    block_out_channels: Sequence[int] = (16, 32, 32),
    layers_per_block: int = 2,
    transformer_layers_per_block: Sequence[int] = (1, 1, 2),
    addition_time_embed_dim: int = 8,
    sample_size: int = 8,
    time_cond_proj_dim: int | None = None,
    seed: int = 0,
):
    """A UNet2DConditionModel laid out like SDXL's: no attention in the outermost stage, deeper transformers inward,
    linear attention projections, and the ``text_time`` added conditioning."""
    from diffusers import UNet2DConditionModel  # deferred: heavy (diffusers)

    n = len(block_out_channels)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1)),
        up_block_types=tuple(["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"]),
        transformer_layers_per_block=tuple(transformer_layers_per_block),
        attention_head_dim=tuple(max(1, c // 8) for c in block_out_channels),
        use_linear_projection=True,
        cross_attention_dim=sum(text_hidden),
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=pooled_dim + NUM_TIME_IDS * addition_time_embed_dim,
        norm_num_groups=8,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def build_tiny_sdxl_pipeline(
    folder: str | Path | None = None,
    *,
    prediction_type: str = "epsilon",
    words: Iterable[str] = (),
    image_size: int = 32,
    vae_blocks: Sequence[int] = (8, 16, 16),
    unet_blocks: Sequence[int] = (16, 32, 32),
    transformer_layers_per_block: Sequence[int] = (1, 1, 2),
    text_hidden: tuple[int, int] = (32, 32),
    text_layers: int = 3,
    time_cond_proj_dim: int | None = None,
    force_zeros_for_empty_prompt: bool = True,
    seed: int = 0,
):
    """A ``StableDiffusionXLPipeline`` of tiny random models; saved to ``folder`` when given.

    ``image_size`` is the pixel resolution (the latent is ``image_size / 2**(len(vae_blocks)-1)``);
    ``text_hidden`` the two encoders' widths (the second one's projection is the pooled width);
    ``text_layers`` >= 2 because SDXL reads the penultimate hidden state. The VAE gets SDXL's scaling factor and
    ``force_upcast`` as in SDXL base's config.
    """
    from diffusers import StableDiffusionXLPipeline  # deferred: heavy (diffusers)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # deferred: heavy (transformers)

    if text_layers < 2:
        raise ValueError(f"text_layers must be >= 2 (SDXL uses the penultimate hidden state), got {text_layers}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "1", words))
        tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "2", words))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_text_config(len(tokenizer), text_hidden[0], text_layers, hidden_act="gelu"))
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(len(tokenizer_2), text_hidden[1], text_layers,
                                                                       hidden_act="gelu"))
    vae = tiny_vae(block_out_channels=vae_blocks, sample_size=image_size, seed=seed)
    vae.register_to_config(scaling_factor=SDXL_VAE_SCALING, force_upcast=True)
    latent = image_size // 2 ** (len(vae_blocks) - 1)
    unet = tiny_sdxl_unet(text_hidden=tuple(text_hidden), pooled_dim=text_hidden[1], block_out_channels=unet_blocks,
                          transformer_layers_per_block=transformer_layers_per_block, sample_size=latent,
                          time_cond_proj_dim=time_cond_proj_dim, seed=seed + 1)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=ddim_scheduler(prediction_type),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False,
    )
    if folder is not None:
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe
