"""Evaluation metrics: FID, Inception Score, CLIP score, HPSv2 and the feature extractors they use."""

from .fid import feature_statistics, fid_from_features, frechet_distance
from .inception_score import inception_score

__all__ = ["feature_statistics", "fid_from_features", "frechet_distance", "inception_score"]
