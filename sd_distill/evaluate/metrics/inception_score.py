"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs", Sec. 4).

    IS = exp( E_x KL( p(y|x) || p(y) ) )

computed per split: the N images are cut into ``splits`` consecutive chunks (``torch.chunk``
sizes: ceil(N / splits) each, the last one shorter when N is not divisible), p(y|x) = softmax of the
classifier logits, p(y) = the chunk's mean of p(y|x). Returned: the mean and the unbiased (ddof = 1)
standard deviation of the per-split scores, as torchmetrics and torch-fidelity report them. The
standard implementations shuffle before splitting; ``permutation`` applies a given order (None = the
order given), so results are reproducible.
"""

from __future__ import annotations

import torch


def inception_score(logits, splits: int = 10, permutation=None) -> tuple[float, float]:
    """(mean, std) Inception Score from [N, K] class logits (float64 internally)."""
    x = torch.as_tensor(logits).double()
    if x.ndim != 2 or x.shape[0] < splits:
        raise ValueError(f"Inception Score needs [N >= splits={splits}, K] logits, got shape {tuple(x.shape)}")
    if permutation is not None:
        x = x[torch.as_tensor(permutation)]
    scores = []
    for chunk in x.chunk(splits, dim=0):
        log_p = chunk.log_softmax(dim=1)  # log p(y|x)
        log_py = log_p.exp().mean(dim=0, keepdim=True).log()  # log p(y) over the split
        kl = (log_p.exp() * (log_p - log_py)).sum(dim=1)  # KL(p(y|x) || p(y)) per image
        scores.append(kl.mean().exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std()) if len(scores) > 1 else 0.0
