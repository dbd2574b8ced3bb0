"""The curate flow: sources -> img2dataset download -> HPSv2 score + filter -> recaption -> Parquet shards.

Wraps ``sd_distill.curate`` step by step; each step is a cached stage in the store, so a rerun with the
same parameters is instant and a failed step reruns alone. Run locally::

    python -m flows.curate                      # the embedded toy world
    prefect deployment run curate/default       # as a deployment (deploy/prefect.yaml)
"""

from __future__ import annotations

from prefect import flow

from flows._common import resolve_store_root
from sd_distill.curate.config import CurateParams
from sd_distill.store import Manifest
from tasks import curate as t


@flow(name="curate", persist_result=True, log_prints=True)
def curate(params: CurateParams = CurateParams(), store_root: str = "") -> Manifest:
    """Build the curated image-text set; returns the manifest of the shards stage."""
    root = resolve_store_root(store_root)
    sources = t.collect_sources(params, [], root)
    downloaded = t.download_images(params, [sources], root)
    scored = t.score_and_filter(params, [downloaded], root)
    captioned = t.recaption(params, [scored], root)
    shards = t.write_shards(params, [sources, downloaded, scored, captioned], root)
    t.publish_curate_summary(shards)
    return shards


if __name__ == "__main__":
    print(curate().uri)
