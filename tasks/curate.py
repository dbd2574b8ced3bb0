"""Prefect tasks of the curate stage: one library call each, cached through the stage store.

Partitioned runs (``params.partitions > 1``) call the per-partition tasks with ``suffix=<label>``
(``p0of3``...): the label names the stage folder (``curate/download-p0of3/<key>``) and selects the rows.
"""

from __future__ import annotations

import shutil

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from sd_distill import curate as lib
from sd_distill.curate.partitions import parse_partition_label
from tasks._stage import stage_task, work_dir


def _sources_key(p):
    return {"sources": p.sources, "max_caption_chars": p.max_caption_chars}


@stage_task("curate/sources", key_of=_sources_key, description="curate: reading sources")
def collect_sources(params, upstream, store_root):
    """Parse every source file (validated before any download) into samples.parquet."""
    return lambda out, inputs, progress: lib.collect_sources(params, out, progress=progress)


@stage_task("curate/download", key_of=lambda p: p.download, description="curate: downloading images (img2dataset)")
def download_images(params, upstream, store_root, suffix=None):
    """Download / load every sample's image (or one partition's: ``suffix`` is its label) with img2dataset."""
    partition = parse_partition_label(suffix) if suffix else None

    def fn(out, inputs, progress):
        work = work_dir()  # img2dataset's partial shards live here, so a retried download resumes
        counts = lib.download_images(params, inputs[0], out, progress=progress, work_dir=work, partition=partition)
        shutil.rmtree(work, ignore_errors=True)  # the raw shards duplicate downloaded.parquet once it is written
        return counts

    return fn


@stage_task("curate/score", key_of=lambda p: p.filter, description="curate: HPSv2 scoring")
def score_and_filter(params, upstream, store_root):
    """Score image-caption pairs with HPSv2 and keep the best."""
    return lambda out, inputs, progress: lib.score_and_filter(params, inputs[0], out, progress=progress)


@stage_task("curate/score", key_of=lambda p: p.filter, description="curate: HPSv2 scoring of one partition")
def score_partition(params, upstream, store_root, suffix):
    """Score one partition's image-caption pairs with HPSv2 (every row; the filter is global)."""
    return lambda out, inputs, progress: lib.score(params, inputs[0], out, progress=progress)


@stage_task("curate/filter", key_of=lambda p: p.filter, description="curate: HPSv2 filter over all partitions")
def filter_scores(params, upstream, store_root):
    """Apply the keep rule to the union of every partition's scores."""
    return lambda out, inputs, progress: lib.filter_scored(params, inputs, out, progress=progress)


@stage_task("curate/caption", key_of=lambda p: {"caption": p.caption, "filter": p.filter}, description="curate: recaptioning")
def recaption(params, upstream, store_root):
    """Recaption with a BLIP-family model, clean, choose the caption by similarity."""
    return lambda out, inputs, progress: lib.recaption(params, inputs[0], out, progress=progress)


@stage_task("curate/caption", key_of=lambda p: {"caption": p.caption, "filter": p.filter}, description="curate: recaptioning one partition")
def recaption_partition(params, upstream, store_root, suffix):
    """Recaption one partition's kept rows (upstream: its download, the global filter)."""
    return lambda out, inputs, progress: lib.recaption_partition(params, inputs[0], inputs[1], out, progress=progress)


@stage_task("curate/shards", key_of=lambda p: p.shards_key(), description="curate: writing shards")
def write_shards(params, upstream, store_root):
    """Write the curated Parquet shards (and WebDataset tars when asked) and one rejects.parquet; accounting must close.

    upstream: [sources, download(s), filter, caption(s)]; the last ``params.partitions`` are captioned folders.
    """
    n = params.partitions
    return lambda out, inputs, progress: lib.write_shards(params, inputs[-n:], inputs[:-n], out)


def publish_curate_summary(manifest) -> dict:
    """Table artifact: per-source counts and rejects by reason; markdown: score distribution."""
    summary = lib.summarize(manifest.path)
    create_table_artifact(key="curate-counts", table=summary["table"], description=f"Curated dataset at {manifest.uri}")
    create_markdown_artifact(key="curate-scores", markdown=summary["markdown"], description="HPSv2 score distribution")
    return summary
