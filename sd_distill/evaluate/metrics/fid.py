"""Frechet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule", Eq. 6).

    FID = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^{1/2})

with mu / Sigma the mean and unbiased covariance (ddof = 1) of the pool features of the reference
(r) and generated (g) images. The matrix square root is scipy's ``sqrtm``; when the product is
near-singular an ``eps * I`` offset is added to both covariances first, and a negligible imaginary
part from round-off is dropped: the procedure of the TF reference code and pytorch-fid.
Features are accumulated in float64.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import linalg


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, Sigma) of an [N, D] feature array: mean and unbiased covariance, float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"FID needs an [N>=2, D] feature array, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula above)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"mean / covariance shapes differ: {mu1.shape} vs {mu2.shape}, {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_to_reference(mu_r, sigma_r) -> Callable[[np.ndarray], float]:
    """FID of generated feature arrays against fixed reference statistics, for many arrays (bootstrap replicates).

    The reference square root is taken once: with S = Sigma_r^{1/2} (symmetric, from ``eigh``),
    Sigma_r Sigma_g = S (S Sigma_g S) S^{-1} has the eigenvalues of the symmetric PSD matrix S Sigma_g S, so
    Tr (Sigma_r Sigma_g)^{1/2} = sum_i sqrt(lambda_i(S Sigma_g S)): one symmetric eigenvalue problem per call
    instead of a general ``sqrtm``. Equal to ``frechet_distance`` up to round-off (tested).
    """
    mu_r = np.atleast_1d(mu_r).astype(np.float64)
    sigma_r = np.atleast_2d(sigma_r).astype(np.float64)
    w, v = np.linalg.eigh((sigma_r + sigma_r.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S = Sigma_r^{1/2}
    trace_r = float(np.trace(sigma_r))

    def fid(features) -> float:
        mu_g, sigma_g = feature_statistics(features)
        if mu_g.shape != mu_r.shape:
            raise ValueError(f"feature dimension {mu_g.shape[0]} differs from the reference's {mu_r.shape[0]}")
        lam = np.linalg.eigvalsh(root @ sigma_g @ root)
        diff = mu_r - mu_g
        return float(diff @ diff + trace_r + np.trace(sigma_g) - 2.0 * np.sqrt(np.clip(lam, 0.0, None)).sum())

    return fid


def fid_from_features(real_features, fake_features) -> float:
    """FID between two [N, D] feature arrays."""
    mu_r, s_r = feature_statistics(real_features)
    mu_g, s_g = feature_statistics(fake_features)
    return frechet_distance(mu_r, s_r, mu_g, s_g)
