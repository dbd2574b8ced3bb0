"""Train the toy attribute classifier (``toy:classifier``): cross-entropy on every attribute head.

Loss per batch: ``sum_h CE(head_h(f(x)), y_h) + CE(primary(f(x)), y_color1 * 3 + y_shape1)`` over clean
scenes; a third of each batch is lightly blurred or noised so generated (softer) images are read as well
as rendered ones. Deterministic on CPU for a given seed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from PIL import ImageFilter

from sd_distill.progress import ProgressFn
from sd_distill.toy._loop import log_progress, optimizer_step
from sd_distill.toy.classifier import HEADS, ToyAttributeClassifier, targets_for
from sd_distill.toy.world import SHAPES, make_samples


class ToyClassifierConfig(BaseModel):
    image_size: int = 32  # input side in pixels (other sizes are resized to it)
    widths: tuple[int, ...] = (16, 32, 64)  # conv stage widths
    feature_dim: int = 128  # the pooled feature size (FID features)
    n_train: int = 2000  # clean training scenes
    n_val: int = 300  # held-out scenes for the reported accuracy
    steps: int = 300  # optimizer steps (the loss is ~0.01 by then; kept short so the retrain test is cheap)
    batch: int = 64  # batch size
    lr: float = 3e-3  # AdamW learning rate, cosine decay to 0
    seed: int = 0  # scenes, init and batches
    threads: int = 1  # torch.set_num_threads (1 is fastest on a busy 2-core machine)


def labelled_scenes(n: int, seed: int, image_size: int, soften: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images [n, 3, S, S] in [0, 1] and a label tensor per head (+ ``primary``); ``soften`` blurs/noises a third."""
    samples = make_samples(n, seed=seed, bad_fraction=0.0, image_size=image_size, prefix="cls")
    rng = np.random.default_rng(seed + 7)
    arrays = []
    for i, s in enumerate(samples):
        img = s.image
        if soften and i % 3 == 1:
            img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if soften and i % 3 == 2:
            arr = np.clip(arr + rng.normal(0, 0.05, arr.shape), 0, 1)
        arrays.append(arr)
    images = torch.from_numpy(np.stack(arrays).astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    targets = [targets_for(s.truth) for s in samples]
    labels = {h: torch.tensor([t[h] for t in targets]) for h in HEADS}
    labels["primary"] = labels["color1"] * len(SHAPES) + labels["shape1"]
    return images, labels


def train_toy_classifier(out_dir: str | Path, cfg: ToyClassifierConfig | None = None, progress: ProgressFn | None = None) -> dict:
    """Train, save to ``out_dir`` and return ``{val_attribute_accuracy, loss, seconds}``."""
    cfg = cfg or ToyClassifierConfig()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    images, labels = labelled_scenes(cfg.n_train, cfg.seed, cfg.image_size, soften=True)
    model = ToyAttributeClassifier(cfg.image_size, cfg.widths, cfg.feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(images), (cfg.batch,), generator=g)
        out = model(images[idx])  # no flip augmentation: it would swap left/right relations
        loss = sum(torch.nn.functional.cross_entropy(out[h], labels[h][idx]) for h in out)
        optimizer_step(loss, opt, losses, sched=sched)
        log_progress(progress, step, cfg.steps, "classifier", losses)
    model.eval()
    # held-out accuracy on fresh clean scenes (another seed)
    val = make_samples(cfg.n_val, seed=cfg.seed + 999, bad_fraction=0.0, image_size=cfg.image_size, prefix="val")
    acc = model.attribute_accuracy([s.image for s in val], [s.truth for s in val])
    model.save_pretrained(out_dir)
    return {"val_attribute_accuracy": acc, "loss": float(np.mean(losses[-50:])), "seconds": time.perf_counter() - t0,
            "config": cfg.model_dump()}
