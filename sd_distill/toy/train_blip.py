"""Train the toy BLIP captioner (``toy:blip``): a tiny ``BlipForConditionalGeneration`` that describes scenes.

Built by :func:`sd_distill.tiny.blip.build_tiny_blip` (ViT image encoder + BERT-style decoder with
cross-attention, ``BertTokenizer`` over the toy vocabulary) and trained with BLIP's captioning loss
(Li et al. 2022, sec. 3.2, "LM"): next-token cross-entropy of the caption given the image,
``L = - sum_t log p(w_t | w_<t, image)``, the decoder input starting with ``[DEC]`` as BLIP's
``generate`` does. Targets are the canonical captions of clean scenes (objects ordered top-then-bottom or
left-then-right, so every image has exactly one right caption and the loss has no irreducible part), so
greedy decoding produces captions :func:`sd_distill.toy.world.parse_caption` reads back. Saved with ``save_pretrained``
(model + ``BlipProcessor``), the folder ``sd_distill.captioning.blip.load_captioner`` reads.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from sd_distill.progress import ProgressFn
from sd_distill.tiny.blip import build_tiny_blip
from sd_distill.toy._loop import log_progress, optimizer_step
from sd_distill.toy.world import WORDS, canonical, caption_accuracy, caption_for, make_samples


class ToyBlipConfig(BaseModel):
    image_size: int = 32  # processor / ViT input side
    patch_size: int = 8  # ViT patches (4x4 at 32 px)
    hidden_size: int = 64  # width of the vision and text transformers
    layers: int = 2  # depth of each transformer
    heads: int = 4  # attention heads
    n_train: int = 2000  # clean training scenes
    n_val: int = 100  # held-out scenes for the reported caption accuracy
    steps: int = 2000  # optimizer steps
    batch: int = 64  # batch size
    lr: float = 2e-3  # AdamW peak learning rate (one-cycle schedule)
    seed: int = 0  # scenes, init and batches
    threads: int = 1  # torch.set_num_threads


def train_toy_blip(out_dir: str | Path, cfg: ToyBlipConfig | None = None, progress: ProgressFn | None = None) -> dict:
    """Train, save to ``out_dir`` and return ``{val_caption_accuracy, loss, seconds}``."""
    from transformers import BlipForConditionalGeneration, BlipProcessor  # deferred: heavy (transformers)

    cfg = cfg or ToyBlipConfig()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    build_tiny_blip(out_dir, words=WORDS, image_size=cfg.image_size, patch_size=cfg.patch_size,
                    hidden_size=cfg.hidden_size, layers=cfg.layers, heads=cfg.heads, seed=cfg.seed)
    model = BlipForConditionalGeneration.from_pretrained(out_dir)
    processor = BlipProcessor.from_pretrained(out_dir)
    tok = processor.tokenizer
    bos = model.config.text_config.bos_token_id

    samples = make_samples(cfg.n_train, seed=cfg.seed + 70, bad_fraction=0.0, image_size=cfg.image_size, prefix="blip")
    pixels = processor(images=[s.image for s in samples], return_tensors="pt")["pixel_values"]
    enc = tok([caption_for(canonical(s.truth)) for s in samples], padding="longest", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    unknown = int((ids == tok.unk_token_id).sum())
    if unknown:
        raise ValueError(f"{unknown} caption tokens are not in the BLIP vocabulary; extend sd_distill.toy.world.WORDS")
    ids[:, 0] = bos  # BLIP's decoder starts from [DEC], not [CLS]
    labels = ids.masked_fill(mask == 0, -100)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(len(samples), (cfg.batch,), generator=g)
        out = model(pixel_values=pixels[idx], input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx])
        optimizer_step(out.loss, opt, losses, sched=sched, clip=model.parameters())
        log_progress(progress, step, cfg.steps, "blip", losses)
    model.eval()
    model.save_pretrained(out_dir)

    val = make_samples(cfg.n_val, seed=cfg.seed + 971, bad_fraction=0.0, image_size=cfg.image_size, prefix="val")
    with torch.no_grad():
        generated = model.generate(pixel_values=processor(images=[s.image for s in val], return_tensors="pt")["pixel_values"],
                                   max_new_tokens=20, num_beams=1, do_sample=False)
    captions = processor.batch_decode(generated, skip_special_tokens=True)
    return {"val_caption_accuracy": caption_accuracy(captions, [s.truth for s in val]), "val_examples": captions[:3],
            "loss": float(np.mean(losses[-50:])), "seconds": time.perf_counter() - t0, "config": cfg.model_dump()}
