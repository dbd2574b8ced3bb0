"""Speed and size of a pipeline's UNet: parameters, MACs per evaluation, latency and evaluations per image.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one UNet forward of a single
latent at the evaluation resolution (conv, linear, matmul and attention FLOPs; MACs = FLOPs / 2).
Per image: MACs per evaluation x UNet evaluations per image (2 per step with CFG, 1 for a
w-conditioned student). Latency is the median wall time per image at batch size 1 after a warm-up image,
text encoding and VAE decoding included, the GPU synchronised.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .generate import UNetEvalCounter, prompt_generators


def unet_parameters(unet: torch.nn.Module) -> int:
    """Number of UNet parameters."""
    return sum(p.numel() for p in unet.parameters())


@torch.no_grad()
def unet_macs_per_eval(pipe, resolution: int) -> int:
    """Multiply-accumulates of one UNet evaluation (one latent) at ``resolution`` pixels."""
    unet = pipe.unet
    param = next(unet.parameters())
    side = resolution // pipe.vae_scale_factor
    sample = torch.zeros(1, unet.config.in_channels, side, side, device=param.device, dtype=param.dtype)
    text_len = pipe.tokenizer.model_max_length
    context = torch.zeros(1, text_len, unet.config.cross_attention_dim, device=param.device, dtype=param.dtype)
    kwargs = {}
    if unet.config.time_cond_proj_dim is not None:
        kwargs["timestep_cond"] = torch.zeros(1, unet.config.time_cond_proj_dim, device=param.device, dtype=param.dtype)
    if unet.config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embedding + 6 size/crop ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=param.device, dtype=param.dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled, device=param.device, dtype=param.dtype),
                                       "time_ids": ids}
    counter = FlopCounterMode(display=False)
    with counter:
        unet(sample, torch.tensor([500], device=param.device), encoder_hidden_states=context, **kwargs)
    return counter.get_total_flops() // 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(pipe, prompts: list[str], steps: int, guidance_scale: float, resolution: int, seed: int = 0,
                    warmup: int = 1) -> dict:
    """Median seconds per image at batch size 1 over ``prompts`` (after warm-up), and UNet evaluations per image.

    The median keeps a busy machine's outliers out; ``latency_mean_s`` is reported beside it.
    """
    if not prompts:
        raise ValueError("measure_latency needs at least one prompt")
    device = pipe.unet.device

    def one(i: int, prompt: str) -> float:
        start = time.perf_counter()
        pipe(prompt=[prompt], num_inference_steps=steps, guidance_scale=guidance_scale, height=resolution,
             width=resolution, generator=prompt_generators(seed, [i]), output_type="pil")
        _sync(device)
        return time.perf_counter() - start

    for i in range(warmup):
        one(i, prompts[i % len(prompts)])
    with UNetEvalCounter(pipe.unet) as counter:
        times = [one(i, prompt) for i, prompt in enumerate(prompts)]
    return {"latency_s": statistics.median(times), "latency_mean_s": statistics.fmean(times),
            "unet_evals_per_image": counter.evals / len(prompts)}


def speed_record(pipe, prompts: list[str], steps: int, guidance_scale: float, resolution: int, seed: int = 0) -> dict:
    """One row's speed columns: latency, UNet evaluations, parameters, MACs per evaluation and per image."""
    lat = measure_latency(pipe, prompts, steps, guidance_scale, resolution, seed)
    macs = unet_macs_per_eval(pipe, resolution)
    return {
        "latency_s": lat["latency_s"],
        "unet_evals": lat["unet_evals_per_image"],
        "unet_params_m": unet_parameters(pipe.unet) / 1e6,
        "unet_gmacs_per_eval": macs / 1e9,
        "unet_gmacs_per_image": macs * lat["unet_evals_per_image"] / 1e9,
    }
