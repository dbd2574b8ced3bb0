"""The curate flow: sources -> img2dataset download -> HPSv2 score + filter -> recaption -> Parquet shards.

Wraps ``sd_distill.curate`` step by step; each step is a cached stage in the store, so a rerun with the
same parameters is instant and a failed step reruns alone. With ``params.partitions = P > 1``, download,
scoring and recaptioning fan out into P stages each (one per contiguous range of the samples), run at
once by the subflow ``curate-partitions`` on a thread pool or a Dask cluster (``params.task_runner``);
the filter and the shards stay global, so the dataset is the one ``partitions=1`` gives. Run locally::

    python -m flows.curate                      # the embedded toy world
    prefect deployment run curate/default       # as a deployment (deploy/prefect.yaml)
    prefect deployment run curate/default -p params='{"partitions": 4, "task_runner": "dask"}'
"""

from __future__ import annotations

import os

from prefect import flow
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows._common import quiet_library_environment, resolve_store_root
from sd_distill.curate.config import CurateParams
from sd_distill.curate.partitions import partition_labels
from sd_distill.store import Manifest
from tasks import curate as t


def partition_task_runner(params: CurateParams):
    """The task runner of the partitions' stages: a thread pool, a new local Dask cluster, or an existing one.

    A LocalCluster listens on 127.0.0.1 only, over TCP (distributed's in-process transport for
    ``processes=False`` still opens its HTTP servers on 0.0.0.0). Its HTTP endpoint takes a random
    loopback port, or 127.0.0.1:8787 with ``params.dask.dashboard`` (the dashboard pages need bokeh).
    """
    if params.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=params.partitions)
    import logging

    from prefect_dask import DaskTaskRunner

    logging.getLogger("distributed").setLevel(logging.WARNING)  # per-worker start/stop lines would drown the run's logs
    d = params.dask
    if d.address:
        return DaskTaskRunner(address=d.address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": d.n_workers or min(params.partitions, os.cpu_count() or 1),
            "processes": d.processes,
            "threads_per_worker": d.threads_per_worker,
            "protocol": "tcp://",
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:8787" if d.dashboard else "127.0.0.1:0",
        }
    )


def results(futures: list[PrefectFuture]) -> list[Manifest]:
    """Every future's manifest once all have finished; raises the first failure (the others still finish and
    are stored, so a rerun rebuilds only the partitions that failed)."""
    wait(futures)
    return [f.result() for f in futures]


@flow(name="curate-partitions", persist_result=True, log_prints=True)
def curate_partitions(params: CurateParams, sources: Manifest, store_root: str) -> Manifest:
    """download / score per partition -> one filter over all scores -> recaption per partition -> merged shards."""
    labels = partition_labels(params.partitions)
    downloaded = [t.download_images.submit(params, [sources], store_root, suffix=p) for p in labels]
    scored = [t.score_partition.submit(params, [d], store_root, suffix=p) for d, p in zip(downloaded, labels)]
    filtered = t.filter_scores(params, results(scored), store_root)
    captioned = [t.recaption_partition.submit(params, [d, filtered], store_root, suffix=p) for d, p in zip(downloaded, labels)]
    return t.write_shards(params, [sources, *results(downloaded), filtered, *results(captioned)], store_root)


@flow(name="curate", persist_result=True, log_prints=True)
def curate(params: CurateParams = CurateParams(), store_root: str = "") -> Manifest:
    """Build the curated image-text set; returns the manifest of the shards stage."""
    quiet_library_environment()
    root = resolve_store_root(store_root)
    sources = t.collect_sources(params, [], root)
    if params.partitions > 1:
        shards = curate_partitions.with_options(task_runner=partition_task_runner(params))(params, sources, root)
    else:
        downloaded = t.download_images(params, [sources], root)
        scored = t.score_and_filter(params, [downloaded], root)
        captioned = t.recaption(params, [scored], root)
        shards = t.write_shards(params, [sources, downloaded, scored, captioned], root)
    t.publish_curate_summary(shards)
    return shards


if __name__ == "__main__":
    print(curate().uri)
