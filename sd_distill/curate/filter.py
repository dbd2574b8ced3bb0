"""Step 3, score and filter: HPSv2 score of every (image, original caption) pair, then the keep rule.

Two halves, so that a partitioned run scores per partition and filters once over all of them:

- ``score(params, downloaded_dir, out_dir)`` -> ``scores.parquet`` (every row's score, no images);
- ``filter_scored(params, [score dirs], out_dir)`` -> ``decisions.parquet`` + ``rejects.parquet``: the
  keep rule on the union of the partitions' scores, so the kept set does not depend on the partitioning;
- ``kept_rows(downloaded_dir, filter_dir, out_path)`` -> ``scored.parquet``: one partition's kept rows
  with their images (what recaption reads);
- ``score_and_filter`` chains the three for an unpartitioned run (one folder, as before).

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

Across partitions, images are de-duplicated before the rule (each partition's download only saw its
own rows): an image whose sha256 already appeared in an earlier partition is rejected as the download
step would have, stage ``download``, reason ``duplicate_image``, ``detail`` the key kept. Partitions are
contiguous ranges of the samples, so "earlier partition" is "earlier in sample order", the download
step's own rule, and the groups the rule ranks are the same as in an unpartitioned run.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from sd_distill.curate.config import CurateParams, FilterParams
from sd_distill.curate.download import DOWNLOADED_FILE
from sd_distill.curate.models import hps_scorer
from sd_distill.curate.schema import (
    DECISIONS_SCHEMA,
    IMAGE_COLUMNS,
    REJECTS_FILE,
    SAMPLE_COLUMNS,
    SCORED_SCHEMA,
    SCORES_SCHEMA,
    TableWriter,
    iter_table,
    read_table,
    rejects_frame,
    write_rejects,
)
from sd_distill.progress import ProgressFn, report

SCORES_FILE = "scores.parquet"
DECISIONS_FILE = "decisions.parquet"
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


def score(params: CurateParams, downloaded_dir: Path, out_dir: Path, progress: ProgressFn | None = None, scorer=None) -> dict:
    """HPSv2 score of every downloaded pair -> ``scores.parquet`` (``SCORES_SCHEMA``, download order).

    ``scorer``: anything with ``.score(images, prompts, batch_size) -> np.ndarray`` and ``.version``
    (tests inject one); by default ``load_hps_scorer(params.filter.hps_model, version=...)``.
    Images are read one batch at a time. Returns ``{"in", "hps_version", "scores", "per_source"}``.
    """
    f = params.filter
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    required = SAMPLE_COLUMNS + IMAGE_COLUMNS
    if scorer is None:
        scorer = hps_scorer(params)
    version = str(getattr(scorer, "version", f.hps_version))
    meta = read_table(downloaded_dir, DOWNLOADED_FILE, required, columns=["key", "source", "url", "caption_original", "sha256"])
    n = len(meta)
    scores = np.empty(n, dtype=np.float32)
    done = 0
    for batch in iter_table(downloaded_dir, DOWNLOADED_FILE, required, f.batch_size, columns=["image", "caption_original"]):
        scores[done : done + len(batch)] = scorer.score(decode_images(batch["image"]), batch["caption_original"].tolist(), batch_size=f.batch_size)
        done += len(batch)
        report(progress, done, n, f"HPS {version} scoring")
    out = meta.assign(hps_score=scores, hps_version=version)
    with TableWriter(out_dir / SCORES_FILE, SCORES_SCHEMA) as writer:
        writer.write(out)
    per_source = {str(k): {"in": int(len(g)), "scores": score_quantiles(g["hps_score"].to_numpy())} for k, g in out.groupby("source", sort=True)}
    return {"in": int(n), "hps_version": version, "scores": score_quantiles(scores), "per_source": per_source}


def _cross_partition_duplicates(scored: pd.DataFrame) -> tuple[np.ndarray, list[str | None]]:
    """(mask, kept key) of rows whose image already appeared in an earlier partition (``part`` column)."""
    first_part = scored.groupby("sha256", sort=False)["part"].transform("min")
    dup = (scored["part"] > first_part).to_numpy()
    winner = scored[~dup].drop_duplicates("sha256").set_index("sha256")["key"]
    return dup, [winner[h] if d else None for h, d in zip(scored["sha256"], dup)]


def filter_scored(params: CurateParams, score_dirs: Sequence[Path], out_dir: Path, progress: ProgressFn | None = None) -> dict:
    """The keep rule over the union of ``score_dirs`` (partitions, in index order); see the module docstring.

    Writes ``decisions.parquet`` (every scored row: kept or not, its score) and ``rejects.parquet``
    (filter rejects, plus cross-partition duplicate images as ``download/duplicate_image``).
    Returns ``{"in", "kept", "rejected", "duplicate_images", "hps_version", "reasons", "scores", "per_source"}``;
    ``in`` counts the scored rows after cross-partition de-duplication.
    """
    f = params.filter
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not score_dirs:
        raise ValueError("filter_scored needs at least one score folder")
    frames = [read_table(d, SCORES_FILE, SCORES_SCHEMA.names).assign(part=i) for i, d in enumerate(score_dirs)]
    scored = pd.concat(frames, ignore_index=True)
    versions = sorted(set(scored["hps_version"]))
    if len(versions) > 1:
        raise ValueError(f"score folders {[str(d) for d in score_dirs]} mix HPS versions {versions}; score them with one model")
    version = versions[0] if versions else f.hps_version
    dup, dup_of = _cross_partition_duplicates(scored)
    rejects = [rejects_frame(scored[dup], "download", "duplicate_image", [k for k in dup_of if k])] if dup.any() else []

    rows = scored[~dup].reset_index(drop=True)
    scores = rows["hps_score"].to_numpy(np.float32)
    kept, reasons = keep_mask(scores, rows["key"].tolist(), rows["source"].tolist(), f)
    details = []
    for r, sc in zip(reasons, scores):
        if r == "hps_below_threshold":
            details.append(f"score {sc:.4f} < threshold {f.threshold:g}")
        elif r == "hps_not_in_top_fraction":
            details.append(f"outside the top {f.top_fraction:g} {'of its source' if f.per_source else 'overall'}")
        else:
            details.append(None)
    bad = ~kept
    if bad.any():
        idx = np.flatnonzero(bad)
        rejects.append(rejects_frame(rows[bad], "filter", [reasons[i] for i in idx], [details[i] for i in idx], rows["hps_score"][bad]))
    n_rejected = write_rejects(rejects, out_dir / REJECTS_FILE) - int(dup.sum())

    decided = np.zeros(len(scored), dtype=bool)
    decided[np.flatnonzero(~dup)] = kept
    with TableWriter(out_dir / DECISIONS_FILE, DECISIONS_SCHEMA) as writer:
        writer.write(scored.assign(kept=decided))
    report(progress, len(scored), len(scored), f"kept {int(kept.sum())} of {len(rows)}")

    per_source = {}
    for name, g in rows.assign(kept=kept).groupby("source", sort=True):
        per_source[str(name)] = {
            "in": int(len(g)),
            "kept": int(g["kept"].sum()),
            "rejected": int((~g["kept"]).sum()),
            "scores": score_quantiles(g["hps_score"].to_numpy()),
        }
    reason_counts = pd.Series([r for r in reasons if r]).value_counts()
    return {
        "in": int(len(rows)),
        "kept": int(kept.sum()),
        "rejected": n_rejected,
        "duplicate_images": int(dup.sum()),
        "hps_version": version,
        "reasons": {str(k): int(v) for k, v in reason_counts.items()},
        "scores": score_quantiles(scores),
        "per_source": per_source,
    }


def kept_rows(downloaded_dir: Path, filter_dir: Path, out_path: Path) -> int:
    """Write the rows of ``downloaded_dir`` that ``filter_dir``'s decisions keep, with their scores, to ``out_path``.

    ``out_path`` gets ``SCORED_SCHEMA`` (recaption's input), in download order; returns the row count.
    Every downloaded row must have a decision (the filter saw this folder's scores), else ValueError.
    """
    decisions = read_table(filter_dir, DECISIONS_FILE, DECISIONS_SCHEMA.names).set_index("key")
    required = SAMPLE_COLUMNS + IMAGE_COLUMNS
    with TableWriter(out_path, SCORED_SCHEMA) as writer:
        for batch in iter_table(downloaded_dir, DOWNLOADED_FILE, required, 1024):
            missing = ~batch["key"].isin(decisions.index)
            if missing.any():
                raise ValueError(
                    f"{Path(filter_dir) / DECISIONS_FILE} has no decision for {int(missing.sum())} rows of "
                    f"{Path(downloaded_dir) / DOWNLOADED_FILE} (e.g. {batch['key'][missing].iloc[0]!r}); "
                    "was this download folder among the filter's inputs?"
                )
            d = decisions.loc[batch["key"]]
            keep = d["kept"].to_numpy(bool)
            batch = batch.assign(hps_score=d["hps_score"].to_numpy(np.float32), hps_version=d["hps_version"].to_numpy())
            writer.write(batch[keep])
        return writer.rows


def score_and_filter(
    params: CurateParams, downloaded_dir: Path, out_dir: Path, progress: ProgressFn | None = None, scorer=None
) -> dict:
    """Score every downloaded pair with HPSv2 and apply the keep rule; write ``scored.parquet`` + ``rejects.parquet``.

    The unpartitioned step: ``score`` -> ``filter_scored`` (over this one folder) -> ``kept_rows``, all
    into ``out_dir`` (which also holds ``scores.parquet`` and ``decisions.parquet``). ``scorer`` as in ``score``.
    """
    score(params, downloaded_dir, out_dir, progress=progress, scorer=scorer)
    counts = filter_scored(params, [out_dir], out_dir)
    kept_rows(downloaded_dir, out_dir, Path(out_dir) / SCORED_FILE)
    return counts
