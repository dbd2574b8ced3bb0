"""Tiny Stable Diffusion pipelines in the real diffusers architectures.

Same classes as SD 1.x / 2.x (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer, DDIMScheduler), a few hundred thousand parameters, saved with
``save_pretrained`` and loaded back through the code paths real checkpoints use.
Tests and the toy world build on them; nothing here is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-unicode table (the alphabet CLIP's BPE works on)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(folder: str | Path, words: Iterable[str] = (), model_max_length: int = 77) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt) with a byte alphabet plus whole-word merges.

    Every byte is a token, so any text tokenizes. Each word in ``words`` gets a left-to-right merge chain;
    BPE applies merges by global rank, so where two words' chains clash (a lower-ranked pair inside a
    longer word, e.g. "orange") the word ends up as a few sub-word tokens instead of one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    seen = set(vocab)
    for word in sorted({w.lower() for w in words if w}):
        chars = list(word)
        if len(chars) < 2:
            continue
        chars[-1] = chars[-1] + "</w>"
        left = chars[0]
        for c in chars[1:]:
            pair = f"{left} {c}"
            left = left + c
            if left not in seen:
                merges.append(pair)
                vocab.append(left)
                seen.add(left)
    vocab += SPECIAL
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + ("\n" if merges else ""))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    )
    return folder


def tiny_unet(
    *,
    cross_attention_dim: int = 32,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 2,
    sample_size: int = 8,
    time_cond_proj_dim: int | None = None,
    in_channels: int = 4,
    seed: int = 0,
):
    """A UNet2DConditionModel laid out like SD's (cross-attention down/up blocks, a mid block)."""
    from diffusers import UNet2DConditionModel  # deferred: heavy (diffusers)

    n = len(block_out_channels)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]),
        up_block_types=tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def tiny_vae(*, block_out_channels: Sequence[int] = (16, 32), latent_channels: int = 4, sample_size: int = 16, seed: int = 0):
    """An AutoencoderKL; each extra block halves the resolution (SD's has four blocks: 8x)."""
    from diffusers import AutoencoderKL  # deferred: heavy (diffusers)

    n = len(block_out_channels)
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=sample_size,
    )


def tiny_clip_text_config(vocab_size: int, hidden_size: int = 32, layers: int = 2, projection_dim: int | None = None,
                          max_len: int = 77, **extra):
    """A small ``CLIPTextConfig`` over ``vocab_size`` tokens (BOS/EOS/PAD at the end of the vocabulary)."""
    from transformers import CLIPTextConfig  # deferred: heavy (transformers)

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=max_len,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        **extra,
    )


def tiny_text_encoder(vocab_size: int, *, hidden_size: int = 32, layers: int = 2, max_len: int = 77, seed: int = 0):
    from transformers import CLIPTextModel  # deferred: heavy (transformers)

    torch.manual_seed(seed)
    return CLIPTextModel(tiny_clip_text_config(vocab_size, hidden_size, layers, max_len=max_len))


def ddim_scheduler(prediction_type: str = "epsilon"):
    """SD's noise schedule (scaled_linear 0.00085 -> 0.012, 1000 steps) in a DDIMScheduler."""
    from diffusers import DDIMScheduler  # deferred: heavy (diffusers)

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_sd_pipeline(
    folder: str | Path | None = None,
    *,
    prediction_type: str = "epsilon",
    words: Iterable[str] = (),
    image_size: int = 32,
    vae_blocks: Sequence[int] = (16, 32, 32),
    unet_blocks: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 2,
    text_hidden: int = 32,
    time_cond_proj_dim: int | None = None,
    seed: int = 0,
):
    """A StableDiffusionPipeline of tiny random models; saved to ``folder`` when given.

    ``image_size`` is the pixel resolution; the latent is ``image_size / 2**(len(vae_blocks)-1)``.
    """
    from diffusers import StableDiffusionPipeline  # deferred: heavy (diffusers)
    from transformers import CLIPTokenizer  # deferred: heavy (transformers)

    with tempfile.TemporaryDirectory() as tmp:
        tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, words))
    text_encoder = tiny_text_encoder(len(tok), hidden_size=text_hidden, seed=seed)
    latent = image_size // 2 ** (len(vae_blocks) - 1)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(block_out_channels=vae_blocks, sample_size=image_size, seed=seed),
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=tiny_unet(
            cross_attention_dim=text_hidden,
            block_out_channels=unet_blocks,
            layers_per_block=layers_per_block,
            sample_size=latent,
            time_cond_proj_dim=time_cond_proj_dim,
            seed=seed + 1,
        ),
        scheduler=ddim_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if folder is not None:
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe
