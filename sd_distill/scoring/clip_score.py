"""CLIP score of generated images against their prompts, with an open_clip model.

CLIPScore (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning",
eq. 1) is ``w * max(cos(E_I, E_C), 0)``; text-to-image papers and torchmetrics use ``w = 100``.
Per pair (:func:`clip_scores`) the clamp is applied to each cosine, as in the paper. For a whole set,
:func:`clip_score` follows torchmetrics' ``CLIPScore`` / ``clip_score`` exactly: the mean of
``100 * cos`` over the set, then ``max(mean, 0)``; the two agree whenever no cosine is negative.

Images go through the model's own open_clip eval transform (shortest-side resize + center crop), the
preprocessing CLIP score is conventionally computed with; load the model with
:func:`sd_distill.scoring.openclip.load_open_clip` (any ref kind it accepts).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from sd_distill.progress import ProgressFn, report
from sd_distill.scoring.openclip import OpenClipModel, load_open_clip

__all__ = ["clip_cosines", "clip_scores", "clip_score", "load_open_clip"]


def clip_cosines(model: OpenClipModel, images: Sequence[Image.Image], prompts: Sequence[str],
                 batch_size: int = 32, progress: Optional[ProgressFn] = None) -> np.ndarray:
    """cos(E_I, E_C) of each (image, prompt) pair, float32 [N]."""
    if len(images) != len(prompts):
        raise ValueError(f"CLIP score needs one prompt per image: got {len(images)} images, {len(prompts)} prompts")
    out = np.empty(len(images), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        pixels = torch.stack([model.preprocess(im if im.mode == "RGB" else im.convert("RGB"))
                              for im in images[start:stop]])
        img = model.encode_pixels(pixels)
        txt = model.encode_texts(prompts[start:stop])
        out[start:stop] = (img * txt).sum(-1).cpu().numpy()
        report(progress, stop, len(images), "CLIP score")
    return out


def clip_scores(model: OpenClipModel, images: Sequence[Image.Image], prompts: Sequence[str],
                batch_size: int = 32) -> np.ndarray:
    """Per-pair CLIPScore 100 * max(cos, 0) (Hessel et al., eq. 1 with w = 100), float32 [N]."""
    return 100.0 * np.maximum(clip_cosines(model, images, prompts, batch_size), 0.0)


def clip_score(model: OpenClipModel, images: Sequence[Image.Image], prompts: Sequence[str],
               batch_size: int = 32, progress: Optional[ProgressFn] = None) -> float:
    """The set's CLIP score as torchmetrics computes it: max(mean(100 * cos), 0)."""
    if not images:
        raise ValueError("CLIP score of an empty set is undefined")
    cos = clip_cosines(model, images, prompts, batch_size, progress)
    return float(max(100.0 * cos.astype(np.float64).mean(), 0.0))
