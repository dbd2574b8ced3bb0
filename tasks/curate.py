"""Prefect tasks of the curate stage: one library call each, cached through the stage store."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from sd_distill import curate as lib
from tasks._stage import stage_task, work_dir


def _sources_key(p):
    return {"sources": p.sources, "max_caption_chars": p.max_caption_chars}


@stage_task("curate/sources", key_of=_sources_key, description="curate: reading sources")
def collect_sources(params, upstream, store_root):
    """Parse every source file (validated before any download) into samples.parquet."""
    return lambda out, inputs, progress: lib.collect_sources(params, out, progress=progress)


@stage_task("curate/download", key_of=lambda p: p.download, description="curate: downloading images (img2dataset)")
def download_images(params, upstream, store_root):
    """Download / load every sample's image with img2dataset."""
    # img2dataset's partial shards live in the stage's work dir, so a retried download resumes
    return lambda out, inputs, progress: lib.download_images(params, inputs[0], out, progress=progress, work_dir=work_dir())


@stage_task("curate/score", key_of=lambda p: p.filter, description="curate: HPSv2 scoring")
def score_and_filter(params, upstream, store_root):
    """Score image-caption pairs with HPSv2 and keep the best."""
    return lambda out, inputs, progress: lib.score_and_filter(params, inputs[0], out, progress=progress)


@stage_task("curate/caption", key_of=lambda p: {"caption": p.caption, "filter": p.filter}, description="curate: recaptioning")
def recaption(params, upstream, store_root):
    """Recaption with a BLIP-family model, clean, choose the caption by similarity."""
    return lambda out, inputs, progress: lib.recaption(params, inputs[0], out, progress=progress)


@stage_task("curate/shards", key_of=lambda p: {"shard_rows": p.shard_rows}, description="curate: writing shards")
def write_shards(params, upstream, store_root):
    """Write the curated Parquet shards and one rejects.parquet; accounting must close."""
    return lambda out, inputs, progress: lib.write_shards(params, inputs[-1], inputs[:-1], out)


def publish_curate_summary(manifest) -> dict:
    """Table artifact: per-source counts and rejects by reason; markdown: score distribution."""
    summary = lib.summarize(manifest.path)
    create_table_artifact(key="curate-counts", table=summary["table"], description=f"Curated dataset at {manifest.uri}")
    create_markdown_artifact(key="curate-scores", markdown=summary["markdown"], description="HPSv2 score distribution")
    return summary
