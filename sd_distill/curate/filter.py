"""Step 3, score and filter: HPSv2 score of every (image, original caption) pair, then the keep rule.

Score (Wu et al. 2023, "Human Preference Score v2", the cosine similarity HPSv2 reports):
``HPS(x, p) = <f_I(T(x)), f_T(p)> / (|f_I(T(x))| |f_T(p)|)`` with ``f_I``, ``f_T`` the fine-tuned
OpenCLIP image and text towers and ``T`` HPSv2's preprocessing; computed batch by batch by
``sd_distill.scoring.hps.HPSScorer.score`` with the model loaded once.

Keep rule, inside each group (each source when ``FilterParams.per_source``, else all samples):

1. ``threshold`` (if set): a score below it is rejected as ``hps_below_threshold``;
2. ``top_fraction`` (if set): only the ``ceil(top_fraction * n_group)`` best-scored samples of the
   group survive (ties broken by key, so the result is deterministic); the others that passed step 1
   are rejected as ``hps_not_in_top_fraction``.

Every row, kept or rejected, carries its ``hps_score``; kept rows also carry ``hps_version``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from sd_distill.curate.config import CurateParams, FilterParams
from sd_distill.curate.download import DOWNLOADED_FILE
from sd_distill.curate.schema import (
    IMAGE_COLUMNS,
    REJECTS_FILE,
    SAMPLE_COLUMNS,
    SCORED_SCHEMA,
    TableWriter,
    iter_table,
    read_table,
    rejects_frame,
    write_rejects,
)
from sd_distill.progress import ProgressFn, report

SCORED_FILE = "scored.parquet"


def decode_images(blobs) -> list[Image.Image]:
    """Encoded image bytes -> RGB PIL images (the download step stored RGB already)."""
    out = []
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            out.append(im.convert("RGB"))
    return out


def keep_mask(scores: np.ndarray, keys: list[str], groups: list[str], f: FilterParams) -> tuple[np.ndarray, list[str | None]]:
    """(kept mask, reject reason per row or None) under the module docstring's keep rule."""
    n = len(scores)
    reasons: list[str | None] = [None] * n
    if f.threshold is not None:
        for i in np.flatnonzero(~(scores >= f.threshold)):  # NaN fails too
            reasons[i] = "hps_below_threshold"
    if f.top_fraction is not None:
        frame = pd.DataFrame({"score": scores, "key": keys, "group": groups if f.per_source else "all"})
        for _, g in frame.groupby("group", sort=False):
            k = math.ceil(f.top_fraction * len(g))
            order = g.sort_values(["score", "key"], ascending=[False, True], na_position="last").index
            for i in order[k:]:
                if reasons[i] is None:
                    reasons[i] = "hps_not_in_top_fraction"
    kept = np.array([r is None for r in reasons], dtype=bool)
    return kept, reasons


def score_quantiles(scores: np.ndarray) -> dict:
    """min / 5% / 25% / 50% / 75% / 95% / max and the mean of the finite scores (plain floats)."""
    s = scores[np.isfinite(scores)]
    if not len(s):
        return {}
    qs = np.quantile(s, [0, 0.05, 0.25, 0.5, 0.75, 0.95, 1])
    names = ["min", "p05", "p25", "p50", "p75", "p95", "max"]
    return {**{n: float(q) for n, q in zip(names, qs)}, "mean": float(s.mean()), "n": int(len(s))}


def score_and_filter(
    params: CurateParams, downloaded_dir: Path, out_dir: Path, progress: ProgressFn | None = None, scorer=None
) -> dict:
    """Score every downloaded pair with HPSv2 and apply the keep rule; write ``scored.parquet`` + ``rejects.parquet``.

    ``scorer``: anything with ``.score(images, prompts, batch_size) -> np.ndarray`` and ``.version``
    (tests inject one); by default ``load_hps_scorer(params.filter.hps_model, version=...)``.
    """
    f = params.filter
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    required = SAMPLE_COLUMNS + IMAGE_COLUMNS
    if scorer is None:
        from sd_distill.scoring.hps import load_hps_scorer

        scorer = load_hps_scorer(f.hps_model, version=f.hps_version, device=f.device)
    version = str(getattr(scorer, "version", f.hps_version))
    # pass 1: scores, reading one batch of images at a time (the keep rule needs all scores first)
    meta = read_table(downloaded_dir, DOWNLOADED_FILE, required, columns=["key", "source"])
    n = len(meta)
    scores = np.empty(n, dtype=np.float32)
    done = 0
    for batch in iter_table(downloaded_dir, DOWNLOADED_FILE, required, f.batch_size, columns=["image", "caption_original"]):
        scores[done : done + len(batch)] = scorer.score(decode_images(batch["image"]), batch["caption_original"].tolist(), batch_size=f.batch_size)
        done += len(batch)
        report(progress, done, n, f"HPS {version} scoring")
    kept, reasons = keep_mask(scores, meta["key"].tolist(), meta["source"].tolist(), f)

    details = []
    for r, sc in zip(reasons, scores):
        if r == "hps_below_threshold":
            details.append(f"score {sc:.4f} < threshold {f.threshold:g}")
        elif r == "hps_not_in_top_fraction":
            details.append(f"outside the top {f.top_fraction:g} {'of its source' if f.per_source else 'overall'}")
        else:
            details.append(None)
    # pass 2: copy the kept rows with their scores, batch by batch
    rejects, start = [], 0
    with TableWriter(out_dir / SCORED_FILE, SCORED_SCHEMA) as writer:
        for batch in iter_table(downloaded_dir, DOWNLOADED_FILE, required, 1024):
            stop = start + len(batch)
            batch = batch.assign(hps_score=scores[start:stop], hps_version=version)
            keep = kept[start:stop]
            writer.write(batch[keep])
            rej = batch[~keep]
            idx = start + np.flatnonzero(~keep)
            if len(rej):
                rejects.append(rejects_frame(rej, "filter", [reasons[i] for i in idx], [details[i] for i in idx], rej["hps_score"]))
            start = stop
    n_rejected = write_rejects(rejects, out_dir / REJECTS_FILE)
    out = meta.assign(hps_score=scores)
    per_source = {}
    for name, g in out.assign(kept=kept).groupby("source", sort=True):
        per_source[str(name)] = {
            "in": int(len(g)),
            "kept": int(g["kept"].sum()),
            "rejected": int((~g["kept"]).sum()),
            "scores": score_quantiles(g["hps_score"].to_numpy()),
        }
    reason_counts = pd.Series([r for r in reasons if r]).value_counts()
    return {
        "in": int(n),
        "kept": int(kept.sum()),
        "rejected": n_rejected,
        "hps_version": version,
        "reasons": {str(k): int(v) for k, v in reason_counts.items()},
        "scores": score_quantiles(scores),
        "per_source": per_source,
    }
