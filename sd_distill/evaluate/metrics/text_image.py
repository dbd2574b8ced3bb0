"""Text-image metrics through ``sd_distill.scoring``'s open_clip models: CLIP score and the HPSv2 score.

CLIP score: ``sd_distill.scoring.clip_score.clip_score`` (Hessel et al. 2021, Eq. 1 with w = 100, as
torchmetrics computes a set's score: max(mean(100 cos), 0)).
HPSv2 (Wu et al. 2023): the cosine similarity of HPSv2's image and text embeddings; the leaderboard
reports the per-style mean x 100 (``hpsv2/evaluation.py`` prints ``mean * 100``), which is the scale
used here (``hps_leaderboard_scale``); the reference table's 0.2659 is the same number / 100.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sd_distill.scoring.hps import load_hps_scorer
from sd_distill.scoring.openclip import load_open_clip

from .features import load_feature_extractor

LEADERBOARD_SCALE = 100.0


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
        p = self.params
        return self._get("features", lambda: load_feature_extractor(p.feature_extractor, p.inception_weights, self.device))

    def clip(self):
        return self._get("clip", lambda: load_open_clip(self.params.clip_model, device=str(self.device)))

    def hps(self, version: str):
        return self._get(("hps", version),
                         lambda: load_hps_scorer(self.params.hps_scorer, version=version, device=str(self.device)))
