"""Text-image metrics through helper "scoring"'s open_clip models: CLIP score and the HPSv2 score.

CLIP score (Hessel et al. 2021, "CLIPScore", Eq. 1 with w = 100, torchmetrics' definition):
    CLIP(x, p) = 100 * max(cos(E_I(x), E_T(p)), 0), averaged over the pairs.
HPSv2 (Wu et al. 2023): the cosine similarity of HPSv2's image and text embeddings; the leaderboard
reports the per-style mean x 100 (``hpsv2/evaluation.py`` prints ``mean * 100``), which is the scale
used here (``hps_leaderboard_scale``); the reference table's 0.2659 is the same number / 100.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

LEADERBOARD_SCALE = 100.0


def clip_scores(clip, images: Sequence, prompts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Per-pair CLIP score 100 * max(cos, 0) with a loaded open_clip model (``scoring.openclip.load_open_clip``)."""
    if len(images) != len(prompts):
        raise ValueError(f"CLIP score needs one prompt per image: {len(images)} images, {len(prompts)} prompts")
    out = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([clip.preprocess(im.convert("RGB")) for im in images[start:start + batch_size]])
        img = clip.encode_pixels(pixels)
        txt = clip.encode_texts(list(prompts[start:start + batch_size]))
        out.append((100.0 * (img * txt).sum(dim=-1).clamp(min=0)).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def hps_leaderboard_scale(scores: Sequence[float]) -> float:
    """The mean score x 100, as the HPSv2 benchmark leaderboard reports a style."""
    return float(np.mean(scores) * LEADERBOARD_SCALE)


class MetricModels:
    """Loads each metric model once (feature extractor, CLIP model, one HPS scorer per version) and keeps it."""

    def __init__(self, params, device: str | torch.device | None = None):
        self.params = params
        self.device = torch.device(device or params.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._cache: dict = {}

    def _get(self, key, load):
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    def extractor(self):
        from .features import load_feature_extractor

        p = self.params
        return self._get("features", lambda: load_feature_extractor(p.feature_extractor, p.inception_weights, self.device))

    def clip(self):
        from sd_distill.scoring.openclip import load_open_clip

        return self._get("clip", lambda: load_open_clip(self.params.clip_model, device=str(self.device)))

    def hps(self, version: str):
        from sd_distill.scoring.hps import load_hps_scorer

        return self._get(("hps", version),
                         lambda: load_hps_scorer(self.params.hps_scorer, version=version, device=str(self.device)))
