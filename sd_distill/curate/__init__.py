"""The curate stage: sources -> img2dataset download -> HPSv2 score + filter -> recaption -> Parquet shards.

Each step is a plain function ``step(params, <input folders>, out_dir, progress=None) -> counts`` that
writes only into ``out_dir`` (the Prefect layer gives each its own stage-store folder):

1. ``collect_sources(params, out_dir)``                                   -> samples.parquet
2. ``download_images(params, collect_dir, out_dir)``                      -> downloaded.parquet
3. ``score_and_filter(params, download_dir, out_dir, scorer=None)``        -> scored.parquet
4. ``recaption(params, filter_dir, out_dir, captioner=None, scorer=None)`` -> captioned.parquet
5. ``write_shards(params, recaption_dir, [collect, download, filter dirs], out_dir)`` -> part-*.parquet

Every step also writes ``rejects.parquet``. With ``CurateParams.partitions = P > 1`` the samples are
split into P contiguous ranges (``partitions.py``) and steps 2-4 run per partition, the filter once
over all partitions' scores:

2. ``download_images(params, collect_dir, out_dir_i, partition=(i, P))``   -> downloaded.parquet
3. ``score(params, download_dir_i, out_dir_i)``                              -> scores.parquet
   ``filter_scored(params, [score dirs], out_dir)``                         -> decisions.parquet
4. ``recaption_partition(params, download_dir_i, filter_dir, out_dir_i)``    -> captioned.parquet
5. ``write_shards(params, [recaption dirs], [collect, downloads..., filter], out_dir)``

and the result is the one an unpartitioned run writes (same kept set, captions, part files).
``run_curate`` chains the steps in sub-folders (notebooks, scripts); ``summarize`` turns the result into a per-source table and a score distribution;
``read_curated`` / ``iter_curated`` read the shards back with a schema check. Every reject's ``reason`` is a
code of ``REASONS`` (``reasons.py``); ``netguard.py`` decides what the downloader may fetch.
"""

from __future__ import annotations

from pathlib import Path

from sd_distill.curate.collect import collect_sources
from sd_distill.curate.config import CaptionParams, CurateParams, DaskParams, DownloadParams, FilterParams, SourceSpec
from sd_distill.curate.download import download_images
from sd_distill.curate.filter import filter_scored, score, score_and_filter
from sd_distill.curate.models import hps_scorer
from sd_distill.curate.partitions import partition_bounds, partition_labels
from sd_distill.curate.reasons import REASONS
from sd_distill.curate.recaption import recaption, recaption_partition
from sd_distill.curate.shards import CURATED_COLUMNS, iter_curated, read_curated, write_shards
from sd_distill.curate.sources import SourceFormatError
from sd_distill.curate.summary import summarize, summary_markdown
from sd_distill.progress import ProgressFn, report

STEPS = ("collect", "download", "filter", "recaption", "shards")

__all__ = [
    "CURATED_COLUMNS", "REASONS", "STEPS", "CaptionParams", "CurateParams", "DaskParams", "DownloadParams", "FilterParams",
    "SourceFormatError", "SourceSpec", "collect_sources", "download_images", "filter_scored", "iter_curated",
    "partition_bounds", "partition_labels", "read_curated", "recaption", "recaption_partition", "run_curate", "score",
    "score_and_filter", "summarize", "summary_markdown", "write_shards",
]


def run_curate(
    params: CurateParams, out_dir: Path, progress: ProgressFn | None = None, scorer=None, captioner=None
) -> dict:
    """Run all five steps into ``out_dir/<n>-<step>/``; returns ``{"counts": {step: counts}, "summary", "shards_dir"}``.

    ``progress`` receives overall progress as (steps done, 5, message). ``scorer`` / ``captioner``
    replace the models named in ``params`` (the same scorer serves filtering and caption choice).
    With ``params.partitions > 1`` the partitions run one after another, each in
    ``<n>-<step>/<label>/`` (``p0of3``...), and the filter's counts are the global ones.
    """
    out = Path(out_dir)
    d = {s: out / f"{i}-{s}" for i, s in enumerate(STEPS, 1)}
    counts = {}
    report(progress, 0, len(STEPS), "collect")
    counts["collect"] = collect_sources(params, d["collect"])
    if scorer is None:
        scorer = hps_scorer(params)
    if params.partitions == 1:
        report(progress, 1, len(STEPS), "download")
        counts["download"] = download_images(params, d["collect"], d["download"])
        report(progress, 2, len(STEPS), "filter")
        counts["filter"] = score_and_filter(params, d["download"], d["filter"], scorer=scorer)
        report(progress, 3, len(STEPS), "recaption")
        counts["recaption"] = recaption(params, d["filter"], d["recaption"], captioner=captioner, scorer=scorer)
        captioned, upstream = d["recaption"], [d["collect"], d["download"], d["filter"]]
    else:
        labels = partition_labels(params.partitions)
        dl, sc, rc = ([d[s] / label for label in labels] for s in ("download", "filter", "recaption"))
        report(progress, 1, len(STEPS), "download")
        counts["download"] = {lb: download_images(params, d["collect"], o, partition=(i, len(labels))) for i, (lb, o) in enumerate(zip(labels, dl))}
        report(progress, 2, len(STEPS), "filter")
        counts["score"] = {lb: score(params, i, o, scorer=scorer) for lb, i, o in zip(labels, dl, sc)}
        counts["filter"] = filter_scored(params, sc, d["filter"])
        report(progress, 3, len(STEPS), "recaption")
        counts["recaption"] = {
            lb: recaption_partition(params, i, d["filter"], o, captioner=captioner, scorer=scorer) for lb, i, o in zip(labels, dl, rc)
        }
        captioned, upstream = rc, [d["collect"], *dl, d["filter"]]
    report(progress, 4, len(STEPS), "shards")
    counts["shards"] = write_shards(params, captioned, upstream, d["shards"])
    report(progress, 5, len(STEPS), "done")
    return {"counts": counts, "summary": summarize(d["shards"]), "shards_dir": str(d["shards"])}
