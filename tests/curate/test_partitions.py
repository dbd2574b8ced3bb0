"""Curation fanned out per partition: the same dataset as an unpartitioned run, per-partition caching, Dask."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from sd_distill.curate import CaptionParams, CurateParams, FilterParams, read_curated
from sd_distill.curate.collect import SAMPLES_FILE
from sd_distill.curate.filter import filter_scored, score, score_and_filter
from sd_distill.curate.partitions import parse_partition_label, partition_bounds, partition_labels
from sd_distill.curate.recaption import recaption, recaption_partition
from sd_distill.curate.schema import read_rejects, rejects_frame, write_rejects
from sd_distill.curate.shards import write_shards
from tests._fixtures_curate import BrightnessScorer, ListCaptioner, write_downloaded

# 30 samples of two sources in collect order: (key, source, gray level, caption). Bright images come first,
# so a filter run per partition would keep a different set than the global rule. Levels repeat: the
# same image bytes under another key, inside one partition (k03 = k01) and across partitions (k14, k27 = k02).
LEVELS = [240, 235, 230, 235, 220, 215, 210, 205, 200, 195, 120, 115, 110, 105, 230, 95, 90, 85, 80, 75,
          40, 35, 30, 25, 20, 15, 10, 230, 5, 2]
ROWS = [(f"k{i:02d}", "A" if i % 3 else "B", lvl, f"{'a bright' if i % 4 == 0 else 'a dim'} square {i}") for i, lvl in enumerate(LEVELS)]
PARAMS = CurateParams(
    filter=FilterParams(top_fraction=0.5, threshold=0.05, per_source=True, batch_size=4),
    caption=CaptionParams(batch_size=4),
    shard_rows=4,
)
CAPTIONS = [f"a {'bright ' if i % 3 == 0 else ''}thing {i}" for i in range(len(ROWS))]


def _collect(folder):
    folder.mkdir(parents=True)
    df = pd.DataFrame({"key": [r[0] for r in ROWS], "source": [r[1] for r in ROWS], "url": [f"http://h/{r[0]}.png" for r in ROWS],
                       "local_path": [None] * len(ROWS), "caption_original": [r[3] for r in ROWS], "extra": ["{}"] * len(ROWS)})
    df.to_parquet(folder / SAMPLES_FILE, index=False)
    write_rejects([], folder / "rejects.parquet")
    return folder, df


def _download(folder, samples, lo, hi):
    """What download_images writes for rows [lo, hi): every image fetched, repeats rejected as duplicate_image."""
    rows, first = ROWS[lo:hi], {}
    kept = [r for r in rows if first.setdefault(r[2], r[0]) == r[0]]
    dups = [r for r in rows if first[r[2]] != r[0]]
    write_downloaded(folder, kept)
    dup_rows = samples[samples["key"].isin([r[0] for r in dups])]
    write_rejects(rejects_frame(dup_rows, "download", "duplicate_image", [first[r[2]] for r in dups]), folder / "rejects.parquet")
    return folder


def _unpartitioned(tmp_path, samples):
    collect = tmp_path / "collect"
    dl = _download(tmp_path / "dl", samples, 0, len(ROWS))
    score_and_filter(PARAMS, dl, tmp_path / "f", scorer=BrightnessScorer())
    recaption(PARAMS, tmp_path / "f", tmp_path / "r", captioner=ListCaptioner(CAPTIONS), scorer=BrightnessScorer())
    write_shards(PARAMS, tmp_path / "r", [collect, dl, tmp_path / "f"], tmp_path / "s")
    return tmp_path / "s"


def _partitioned(tmp_path, samples, p):
    collect, labels = tmp_path / "collect", partition_labels(p)
    dls = [_download(tmp_path / f"dl-{lb}", samples, *partition_bounds(len(ROWS), i, p)) for i, lb in enumerate(labels)]
    scs = [tmp_path / f"sc-{lb}" for lb in labels]
    for dl, sc in zip(dls, scs):
        score(PARAMS, dl, sc, scorer=BrightnessScorer())
    counts = filter_scored(PARAMS, scs, tmp_path / "f")
    captioner = ListCaptioner(CAPTIONS)  # hands out captions in call order: partition order is sample order
    rcs = [tmp_path / f"rc-{lb}" for lb in labels]
    for dl, rc in zip(dls, rcs):
        recaption_partition(PARAMS, dl, tmp_path / "f", rc, captioner=captioner, scorer=BrightnessScorer())
    write_shards(PARAMS, rcs, [collect, *dls, tmp_path / "f"], tmp_path / "s")
    return tmp_path / "s", counts


def test_partition_bounds_are_contiguous_balanced_and_labels_round_trip():
    for n, p in [(30, 3), (31, 4), (2, 5), (0, 2)]:
        bounds = [partition_bounds(n, i, p) for i in range(p)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1
    assert partition_labels(3) == ["p0of3", "p1of3", "p2of3"] and parse_partition_label("p2of3") == (2, 3)
    with pytest.raises(ValueError, match=r"expected 'p<index>of<count>'"):
        parse_partition_label("part2")
    with pytest.raises(ValueError, match=r"partition index 3 is outside 0..2"):
        parse_partition_label("p3of3")


def test_dask_address_without_dask_runner_is_refused():
    with pytest.raises(ValueError, match="task_runner='dask'"):
        CurateParams(dask={"address": "tcp://127.0.0.1:8786"})
    with pytest.raises(ValueError, match="partitions"):
        CurateParams(partitions=0)


def test_partition_task_runner_local_dask_cluster_listens_on_loopback_only():
    import psutil
    from distributed import LocalCluster
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.curate import partition_task_runner

    assert isinstance(partition_task_runner(CurateParams(partitions=3)), ThreadPoolTaskRunner)
    remote = partition_task_runner(CurateParams(partitions=3, task_runner="dask", dask={"address": "tcp://10.0.0.5:8786"}))
    assert remote.address == "tcp://10.0.0.5:8786"
    runner = partition_task_runner(CurateParams(partitions=3, task_runner="dask", dask={"n_workers": 2}))

    def listening():
        return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}

    before = listening()
    with LocalCluster(**runner.cluster_kwargs) as cluster:
        opened = listening() - before
        assert len(cluster.workers) == 2 and cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    assert opened and {ip for ip, _ in opened} == {"127.0.0.1"}, opened  # scheduler, workers, HTTP endpoints


def test_three_partitions_give_the_unpartitioned_dataset(tmp_path):
    _, samples = _collect(tmp_path / "one" / "collect")
    _collect(tmp_path / "three" / "collect")
    one = _unpartitioned(tmp_path / "one", samples)
    three, counts = _partitioned(tmp_path / "three", samples, 3)
    a, b = read_curated(one), read_curated(three)
    assert len(a) == 14 and a["key"].tolist() == b["key"].tolist()
    pd.testing.assert_frame_equal(a, b)  # captions, scores, images, extras, row order
    ra, rb = read_rejects(one), read_rejects(three)
    pd.testing.assert_frame_equal(ra, rb)
    # k27 repeats k02's image from another partition: rejected like an in-partition duplicate, naming k02
    assert counts["duplicate_images"] == 2
    dup = rb.set_index("key").loc[["k03", "k14", "k27"]]
    assert (dup["stage"] == "download").all() and dup["detail"].tolist() == ["k01", "k02", "k02"]
    parts = [sorted(p.name for p in (tmp_path / d / "s").glob("part-*")) for d in ("one", "three")]
    assert parts[0] == parts[1] == [f"part-{i:05d}.parquet" for i in range(4)]  # 14 rows, 4 per part, same cuts


def test_filtering_each_partition_alone_would_keep_another_set(tmp_path):
    """The check above has teeth: the keep rule is not local to a partition."""
    _, samples = _collect(tmp_path / "collect")
    three, _ = _partitioned(tmp_path / "three", samples, 3)
    global_kept = set(read_curated(three, columns=["key"])["key"])
    local_kept = set()
    for i in range(3):
        dl = _download(tmp_path / f"dl{i}", samples, *partition_bounds(len(ROWS), i, 3))
        score_and_filter(PARAMS, dl, tmp_path / f"f{i}", scorer=BrightnessScorer())
        local_kept |= set(pd.read_parquet(tmp_path / f"f{i}" / "scored.parquet")["key"])
    assert local_kept != global_kept and len(local_kept) > len(global_kept)
    assert "k27" in local_kept and "k27" not in global_kept


def test_write_shards_refuses_a_partition_that_lost_its_rejects(tmp_path):
    _, samples = _collect(tmp_path / "collect")
    _partitioned(tmp_path, samples, 3)
    (tmp_path / "dl-p0of3" / "rejects.parquet").unlink()  # k03's duplicate reject vanished
    rcs = [tmp_path / f"rc-{lb}" for lb in partition_labels(3)]
    dls = [tmp_path / f"dl-{lb}" for lb in partition_labels(3)]
    with pytest.raises(AssertionError, match="1 collected samples are neither kept nor rejected"):
        write_shards(PARAMS, rcs, [tmp_path / "collect", *dls, tmp_path / "f"], tmp_path / "s2")


# -- the flow, for real: img2dataset per partition, tiny models, a Dask LocalCluster -------------------
def _task_states_since(t0) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(limit=200, sort=TaskRunSort.EXPECTED_START_TIME_DESC)
    # stage tasks only: a subflow call also shows up as a task run of its parent ("curate-partitions-0")
    return {r.name: r.state.name for r in runs if r.created >= t0 and not r.name.startswith("curate-partitions")}


def _manifest_mtimes(root) -> dict[str, int]:
    return {str(p.relative_to(root).parent): p.stat().st_mtime_ns for p in root.glob("curate/*/*/manifest.json")}


@pytest.mark.slow  # three img2dataset runs (one per partition + the reference), each a few interpreter starts
@pytest.mark.usefixtures("prefect_harness")
def test_partitioned_flow_on_dask_equals_unpartitioned_caches_and_rebuilds_one_partition(tmp_path):
    import datetime as dt

    from flows.curate import curate
    from sd_distill.curate import DaskParams, DownloadParams, SourceSpec

    base = dict(sources=[SourceSpec(kind="toy", toy_n=48, toy_seed=5)], download=DownloadParams(threads=8),
                filter=FilterParams(batch_size=16), caption=CaptionParams(max_new_tokens=8, batch_size=16), shard_rows=16)
    root = tmp_path / "store"
    one = curate(CurateParams(**base), str(root))
    # a real LocalCluster: 2 workers for 2 partitions, threads (processes=False) so workers start at once
    params = CurateParams(**base, partitions=2, task_runner="dask", dask=DaskParams(n_workers=2, processes=False))
    two = curate(params, str(root))
    assert two.key != one.key and two.counts["kept"] == one.counts["kept"] and two.counts["per_source"] == one.counts["per_source"]
    a, b = read_curated(one.path), read_curated(two.path)
    assert a["key"].tolist() == b["key"].tolist() and a["caption"].tolist() == b["caption"].tolist()
    np.testing.assert_allclose(a["hps_score"], b["hps_score"], atol=1e-5)  # batches differ: float rounding only
    assert (a["image"] == b["image"]).all()
    assert sorted(read_rejects(one.path)["key"]) == sorted(read_rejects(two.path)["key"])
    stages = {p.name for p in (root / "curate").iterdir()}
    assert {"download-p0of2", "download-p1of2", "score-p0of2", "score-p1of2", "filter", "caption-p0of2", "caption-p1of2"} <= stages

    # an identical rerun: every stage task is Cached, nothing in the store is rewritten
    before, t0 = _manifest_mtimes(root), dt.datetime.now(dt.timezone.utc)
    again = curate(params, str(root))
    states = _task_states_since(t0)
    assert again.key == two.key and _manifest_mtimes(root) == before
    assert states and set(states.values()) == {"Cached"}, sorted(states.items())

    # one partition's stage folder lost: only that partition's stage is rebuilt, the others stay as they were
    shutil.rmtree(root / "curate" / "caption-p1of2")
    t1 = dt.datetime.now(dt.timezone.utc)
    third = curate(params, str(root))
    after = _manifest_mtimes(root)
    rebuilt = sorted(k for k in after if after[k] != before.get(k))
    assert rebuilt == [f"curate/caption-p1of2/{next((root / 'curate' / 'caption-p1of2').iterdir()).name}"]
    assert third.key == two.key
    states = _task_states_since(t1)
    assert sorted(s for s in states.values() if s != "Cached") == ["Completed"], states
