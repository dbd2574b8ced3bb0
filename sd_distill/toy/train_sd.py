"""Train the toy Stable Diffusion teacher (``toy:sd``) and its v-prediction fine-tune (``toy:sd-v``) on CPU.

What it learns from: the web-like mix the toy sources publish (:func:`sd_distill.toy.world.make_samples` at
``WEB_BAD_FRACTION`` bad pairs and ``WEB_WEAK_FRACTION`` weak captions among the good ones), uncurated, as SD 1.5
learned from LAION: wrong and boilerplate captions, blurred / noise / blank images under true captions, partial,
unordered and decorated alt-text. Only pairs whose published caption is the true one also get a paraphrase.
The curated set the DAG builds from the same world drops the bad pairs and recaptions the weak ones, so it holds
better pairs than the teacher saw (different scenes: training seed ``seed``, sources seeded by the run).

Three phases, in order:

1. VAE (``AutoencoderKL``): reconstruct scenes, loss ``MSE(x, D(z)) + beta * KL(q(z|x) || N(0, I))``
   (Kingma & Welling 2014, eq. 10; ``z`` sampled from the posterior). Afterwards SD's latent scale is set:
   ``scaling_factor = 1 / std(z)`` so that scaled latents have unit variance (Rombach et al. 2022, sec. 4.3.2).
2. UNet + CLIP text encoder, jointly, epsilon prediction (Ho et al. 2020, eq. 14):
   ``L = || eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, c) ||^2`` with ``c`` the encoder's
   last hidden state; 10 % of captions are replaced by ``""`` (Ho & Salimans 2022, classifier-free guidance),
   so ``eps_u + w (eps_c - eps_u)`` works at sampling time. The text encoder is trained (not kept random):
   its hidden size is 32, and learning which tokens matter is cheaper than asking the UNet to decode random
   features of multi-token words.
3. Optional: the same UNet fine-tuned to v-prediction, target ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0``
   (Salimans & Ho 2022, sec. 4), text encoder frozen; saved as a second pipeline folder.

Everything is deterministic on CPU for a given seed (``torch.use_deterministic_algorithms``).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from sd_distill.progress import ProgressFn
from sd_distill.tiny.sd import build_tiny_sd_pipeline, ddim_scheduler
from sd_distill.toy._loop import log_progress, optimizer_step
from sd_distill.toy.world import WEB_BAD_FRACTION, WEB_WEAK_FRACTION, WORDS, make_samples, paraphrase_for


class ToySDConfig(BaseModel):
    image_size: int = 32  # pixels; latents are image_size / 4 (three VAE blocks)
    n_scenes: int = 3000  # training pairs (rendered once, reused every epoch)
    bad_fraction: float = WEB_BAD_FRACTION  # planted bad pairs among them (the toy sources' published rate)
    weak_fraction: float = WEB_WEAK_FRACTION  # weak captions among the good pairs (the published rate)
    vae_blocks: tuple[int, ...] = (16, 32, 32)  # AutoencoderKL block widths (3 blocks: /4)
    unet_blocks: tuple[int, ...] = (32, 64, 64)  # UNet block widths at 8x8, 4x4, 2x2 latents
    unet_layers_per_block: int = 1  # resnets per UNet block (SD uses 2; 1 halves the CPU time)
    vae_steps: int = 1000  # VAE optimizer steps
    vae_batch: int = 32  # VAE batch size
    vae_lr: float = 2e-3  # AdamW learning rate of the VAE
    kl_weight: float = 1e-6  # beta in the VAE loss (SD's VAE uses a tiny KL weight too)
    unet_steps: int = 3000  # UNet + text encoder optimizer steps (epsilon)
    unet_batch: int = 64  # UNet batch size
    unet_lr: float = 1e-3  # peak AdamW learning rate, cosine decay after a 100-step warmup
    cond_dropout: float = 0.1  # fraction of captions replaced by "" (needed for classifier-free guidance)
    v_steps: int = 800  # v-prediction fine-tune steps (0 skips toy:sd-v)
    seed: int = 0  # seeds scenes, initialization and batches
    threads: int = 1  # torch.set_num_threads; 2 threads ran 10x slower than 1 on 2 cores shared with other jobs
    device: str = "cpu"  # "cuda" trains the same loop on a GPU (random draws stay on CPU generators)
    save_fp16: bool = True  # store weights as float16 (half the size; diffusers loads them as float32)


class ToySDLpb2Config(ToySDConfig):
    """``toy:sd-lpb2``: the same recipe with SD's two (resnet, attention) pairs per UNet down stage (three per up
    stage), the layout BK-SDM block removal is defined on; no v-prediction copy."""

    unet_layers_per_block: int = 2
    v_steps: int = 0


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to 10 % of ``peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def scene_tensors(n: int, seed: int, image_size: int, bad_fraction: float = WEB_BAD_FRACTION,
                  weak_fraction: float = WEB_WEAK_FRACTION) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """``n`` web-like pairs as a ``[n, 3, H, W]`` tensor in [-1, 1] and, per pair, two captions to draw from:
    (published caption, paraphrase) when the published caption is the true one, else the published caption twice."""
    samples = make_samples(n, seed=seed, bad_fraction=bad_fraction, image_size=image_size, prefix="train",
                           weak_fraction=weak_fraction)
    arr = np.stack([np.asarray(s.image, dtype=np.float32) for s in samples]) / 127.5 - 1.0
    captions = [(s.caption, paraphrase_for(s.truth) if s.caption_kind == "true" else s.caption) for s in samples]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), captions


def train_vae(vae, images: torch.Tensor, cfg: ToySDConfig, progress: ProgressFn | None = None) -> list[float]:
    """Phase 1: fit the autoencoder; returns the loss per step."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    losses = []
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, warmup=50)
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=g).to(images.device)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(x.device)
        recon = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        optimizer_step(loss, opt, losses, clip=vae.parameters())
        log_progress(progress, step, cfg.vae_steps, "vae", losses, digits=4)
    vae.eval()
    return losses


@torch.no_grad()
def latent_moments(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled latents)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(images[i : i + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(pipe, mean, std, captions, cfg: ToySDConfig, prediction_type: str, steps: int, train_text: bool,
               progress: ProgressFn | None = None) -> list[float]:
    """Phases 2/3: denoising loss for ``prediction_type`` (epsilon or v_prediction); returns the loss per step."""
    unet, text_encoder, tokenizer, sched = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    scale = pipe.vae.config.scaling_factor
    g = torch.Generator().manual_seed(cfg.seed + (1 if prediction_type == "epsilon" else 2))
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-4)
    dev = mean.device
    alphas_cumprod = sched.alphas_cumprod.to(dev)
    unet.train()
    text_encoder.train(train_text)
    text_encoder.requires_grad_(train_text)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg.unet_lr)
        idx = torch.randint(len(mean), (cfg.unet_batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g).to(dev)) * scale
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.cond_dropout
        which = torch.randint(2, (cfg.unet_batch,), generator=g)  # canonical caption or paraphrase
        texts = ["" if d else captions[i][w] for i, d, w in zip(idx.tolist(), drop.tolist(), which.tolist())]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        cond = text_encoder(ids.to(dev))[0]
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g).to(dev)
        t = t.to(dev)
        a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)  # sqrt(abar_t)
        s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)  # sqrt(1 - abar_t)
        zt = a * z0 + s * eps
        target = eps if prediction_type == "epsilon" else a * eps - s * z0
        loss = torch.nn.functional.mse_loss(unet(zt, t, cond).sample, target)
        optimizer_step(loss, opt, losses, clip=params)
        log_progress(progress, step, steps, f"unet[{prediction_type}]", losses, digits=4)
    unet.eval()
    text_encoder.eval()
    text_encoder.requires_grad_(False)
    return losses


def halve_safetensors(folder: str | Path) -> int:
    """Rewrite every float32 ``*.safetensors`` under ``folder`` as float16; returns the number of files."""
    files = sorted(Path(folder).rglob("*.safetensors"))
    for f in files:
        state = load_file(str(f))
        save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in state.items()}, str(f), metadata={"format": "pt"})
    return len(files)


def train_toy_sd(out_dir: str | Path, cfg: ToySDConfig | None = None, v_out_dir: str | Path | None = None,
                 progress: ProgressFn | None = None) -> dict:
    """Train and save ``toy:sd`` to ``out_dir`` (and ``toy:sd-v`` to ``v_out_dir`` when ``cfg.v_steps > 0``).

    Returns a summary: final losses, the latent scaling factor, seconds per phase.
    """
    cfg = cfg or ToySDConfig()
    torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda"):  # cuBLAS needs a fixed workspace; some CUDA backward kernels only warn
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    pipe = build_tiny_sd_pipeline(
        words=WORDS, image_size=cfg.image_size, vae_blocks=cfg.vae_blocks, unet_blocks=cfg.unet_blocks,
        layers_per_block=cfg.unet_layers_per_block, seed=cfg.seed,
    )
    images, captions = scene_tensors(cfg.n_scenes, cfg.seed, cfg.image_size, cfg.bad_fraction, cfg.weak_fraction)
    pipe.to(cfg.device)
    images = images.to(cfg.device)
    timings, summary = {}, {"config": cfg.model_dump()}

    t0 = time.perf_counter()
    vae_losses = train_vae(pipe.vae, images, cfg, progress)
    mean, std = latent_moments(pipe.vae, images)
    scaling = float(1.0 / torch.cat([mean, mean + std]).std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    timings["vae_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    eps_losses = train_unet(pipe, mean, std, captions, cfg, "epsilon", cfg.unet_steps, train_text=True, progress=progress)
    timings["unet_s"] = time.perf_counter() - t0
    pipe.to("cpu").save_pretrained(str(out_dir), safe_serialization=True)
    if cfg.save_fp16:
        halve_safetensors(out_dir)
    pipe.to(cfg.device)
    summary.update(vae_loss=float(np.mean(vae_losses[-50:])), unet_loss=float(np.mean(eps_losses[-100:])), scaling_factor=scaling)

    if v_out_dir is not None and cfg.v_steps > 0:
        t0 = time.perf_counter()
        pipe.scheduler = ddim_scheduler("v_prediction")
        v_losses = train_unet(pipe, mean, std, captions, cfg, "v_prediction", cfg.v_steps, train_text=False, progress=progress)
        pipe.to("cpu").save_pretrained(str(v_out_dir), safe_serialization=True)
        if cfg.save_fp16:
            halve_safetensors(v_out_dir)
        timings["v_s"] = time.perf_counter() - t0
        summary["v_loss"] = float(np.mean(v_losses[-100:]))
    summary["timings"] = timings
    return summary
