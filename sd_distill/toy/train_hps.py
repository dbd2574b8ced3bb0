"""Train the toy HPS scorer (``toy:hps``): a tiny open_clip CLIP that prefers matching, clean image-text pairs.

Architecture: :func:`sd_distill.tiny.clip.tiny_open_clip_config` (ViT vision tower, CLIP text tower with
open_clip's real 49,408-token BPE, so ``open_clip.get_tokenizer`` works unchanged). Saved in the hub layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``) that :func:`sd_distill.scoring.openclip.load_open_clip`
and open_clip's ``local-dir:`` loader read.

Loss: CLIP's symmetric InfoNCE (Radford et al. 2021, fig. 3) with extra negatives, the bad pairs the toy
world plants. For a batch of B clean pairs (x_i, p_i), degraded images d_i (blur / noise / blank of x_i)
and boilerplate captions q_i:

    L = CE( s * [f(x_i) . g(p_1..p_B), f(x_i) . g(q_1..q_B)], i )     image -> text, wrong captions + boilerplate
      + CE( s * [g(p_i) . f(x_1..x_B), g(p_i) . f(d_1..d_B)], i )     text -> image, other scenes + degraded copies

with unit-norm embeddings f, g and the learned logit scale s. So the cosine similarity HPSv2 reports is high
for a clean matching pair and low for a wrong caption, boilerplate, or a degraded image, the separation a
threshold filter needs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from sd_distill.progress import ProgressFn
from sd_distill.tiny.clip import (OPENAI_MEAN, OPENAI_STD, register_open_clip_config, save_open_clip_folder,
                                  tiny_open_clip_config)
from sd_distill.toy._loop import log_progress, optimizer_step
from sd_distill.toy.world import boilerplate_caption, degrade_image, make_samples, paraphrase_for

DEGRADE_KINDS = ("blur", "noise", "blank")


class ToyHPSConfig(BaseModel):
    image_size: int = 32  # model input side (HPS preprocessing pads / resizes to it)
    patch_size: int = 8  # ViT patch size: 4x4 patches at 32 px
    embed_dim: int = 32  # joint embedding size
    vision_width: int = 64  # ViT width
    vision_layers: int = 3  # ViT depth
    text_width: int = 32  # text transformer width (the 49,408 x width token table dominates the file size)
    text_layers: int = 2  # text transformer depth
    n_train: int = 2000  # clean scenes (each also yields one degraded copy)
    steps: int = 700  # optimizer steps
    batch: int = 64  # clean pairs per batch
    lr: float = 2e-3  # AdamW peak learning rate, cosine decay
    seed: int = 0  # scenes, init and batches
    threads: int = 1  # torch.set_num_threads
    save_fp16: bool = True  # store weights as float16 (half the size; open_clip loads them into float32)


def hps_training_data(cfg: ToyHPSConfig):
    """Normalised clean images, degraded copies, clean captions (caption or paraphrase) and boilerplate texts."""
    samples = make_samples(cfg.n_train, seed=cfg.seed + 50, bad_fraction=0.0, image_size=cfg.image_size, prefix="hps")
    rng = np.random.default_rng(cfg.seed + 51)
    clean = np.stack([np.asarray(s.image, dtype=np.float32) / 255.0 for s in samples])
    bad = np.stack([np.asarray(degrade_image(s.image, DEGRADE_KINDS[i % 3], rng), dtype=np.float32) / 255.0
                    for i, s in enumerate(samples)])
    mean, std = np.array(OPENAI_MEAN, np.float32), np.array(OPENAI_STD, np.float32)
    to_t = lambda a: torch.from_numpy((a - mean) / std).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    captions = [(s.true_caption, paraphrase_for(s.truth)) for s in samples]
    boiler = [boilerplate_caption(rng) for _ in range(500)]
    return to_t(clean), to_t(bad), captions, boiler


def train_toy_hps(out_dir: str | Path, cfg: ToyHPSConfig | None = None, progress: ProgressFn | None = None) -> dict:
    """Train the scorer, save it to ``out_dir`` (hub layout) and return a summary with the final loss."""
    import open_clip  # deferred: heavy (open_clip)

    cfg = cfg or ToyHPSConfig()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    model_cfg = tiny_open_clip_config(
        embed_dim=cfg.embed_dim, image_size=cfg.image_size, patch_size=cfg.patch_size, vision_width=cfg.vision_width,
        vision_layers=cfg.vision_layers, text_width=cfg.text_width, text_layers=cfg.text_layers,
    )
    with tempfile.TemporaryDirectory() as tmp:  # register the architecture without leaving files in out_dir
        register_open_clip_config("toy-hps", model_cfg, Path(tmp))
        torch.manual_seed(cfg.seed)
        model = open_clip.create_model("toy-hps", pretrained=None)
    tokenizer = open_clip.get_tokenizer("toy-hps")
    clean, bad, captions, boiler = hps_training_data(cfg)
    all_texts = sorted({c for pair in captions for c in pair} | set(boiler))
    tokens = dict(zip(all_texts, tokenizer(all_texts)))

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(len(clean), (cfg.batch,), generator=g)
        which = torch.randint(2, (cfg.batch,), generator=g).tolist()
        texts = [captions[i][w] for i, w in zip(idx.tolist(), which)]
        junk = [boiler[j] for j in torch.randint(len(boiler), (cfg.batch,), generator=g).tolist()]
        f_img = torch.nn.functional.normalize(model.encode_image(torch.cat([clean[idx], bad[idx]])), dim=-1)
        f_txt = torch.nn.functional.normalize(model.encode_text(torch.stack([tokens[t] for t in texts + junk])), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        target = torch.arange(cfg.batch)
        # the same caption may appear twice in a batch; mask exact duplicates out of the negatives
        same = torch.tensor([[a == b for b in texts] for a in texts])
        dup = same & ~torch.eye(cfg.batch, dtype=torch.bool)
        mask = torch.cat([dup, torch.zeros_like(dup)], dim=1)
        img2txt = (scale * f_img[: cfg.batch] @ f_txt.T).masked_fill(mask, -1e4)  # x_i vs [p_1..B, q_1..B]
        txt2img = (scale * f_txt[: cfg.batch] @ f_img.T).masked_fill(mask, -1e4)  # p_i vs [x_1..B, d_1..B]
        loss = (torch.nn.functional.cross_entropy(img2txt, target) + torch.nn.functional.cross_entropy(txt2img, target)) / 2
        optimizer_step(loss, opt, losses, sched=sched)
        log_progress(progress, step, cfg.steps, "hps", losses)
    model.eval()
    if cfg.save_fp16:
        model = model.half()
    save_open_clip_folder(model, model_cfg, out_dir, cfg.image_size)
    return {"loss": float(np.mean(losses[-50:])), "seconds": time.perf_counter() - t0, "config": cfg.model_dump()}
