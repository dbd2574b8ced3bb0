"""Kill drills through a real Prefect server and process worker: SIGKILL the worker's whole process tree
mid-download, rerun the deployment on a new worker, SIGKILL it again mid-training, rerun once more.

The DAG (``curate-and-distill/demo`` from deploy/prefect.yaml) curates a URL list served by the loopback
``hostile_server`` (every request counted, ``slowgood`` answers throttled so img2dataset's 3-row shards take
over half a second each), then distils the toy teacher for a few steps with a checkpoint every two. The third run
completes; the URLs of the shards img2dataset finished before the first kill are requested exactly once in
all; training resumes from the checkpoint the second kill left (the phase's manifest records
``resumed_from`` and ``steps_this_run``); and in the curated set rows in = kept + rejected.
A killed flow run stays ``Running`` on the server (nothing reports its end); the reruns are new flow runs of
the same deployment, which the stage store and the per-stage work folders resume.
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from tests._fixtures_hostile import hostile_server
from tests._prefect_server import REPO, prefect_cli, prefect_server, prefect_worker

pytestmark = pytest.mark.slow

POOL = "kill-drill-pool"
N, SHARD = 12, 3  # 11 throttled good URLs + one 404, img2dataset shards of 3 rows
MAX_STEPS, CHECKPOINT_EVERY = 6, 2


def _params(url_list: Path, store: Path) -> dict:
    return {
        "curate": {
            "sources": [{"kind": "url_list", "path": str(url_list)}],
            "download": {"shard_size": SHARD, "threads": 1, "retries": 0, "timeout": 10,
                         "allowed_networks": ["127.0.0.1/32"]},
        },
        "distill": {"trainer": {"max_steps": MAX_STEPS, "checkpoint_every": CHECKPOINT_EVERY}},
        "toy_eval_prompts": 4,
        "store_root": str(store),
    }


@contextmanager
def _client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def _start(api_url: str, params: dict) -> str:
    """A new flow run of the deployment (what `prefect deployment run` does, without starting a CLI process)."""
    with _client(api_url) as client:
        deployment = client.read_deployment_by_name("curate-and-distill/demo")
        return str(client.create_flow_run_from_deployment(deployment.id, parameters=params).id)


def _state(api_url: str, run_id: str) -> str:
    with _client(api_url) as client:
        state = client.read_flow_run(run_id).state
    return state.type.value if state is not None else "NONE"


def _wait_for(cond, timeout: float, what: str, run: tuple[str, str] | None = None, poll: float = 0.05):
    """Poll ``cond`` until it returns something truthy; fail early if the flow run ``run`` ended."""
    deadline, next_check = time.monotonic() + timeout, 0.0
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if run is not None and time.monotonic() > next_check:
            state = _state(*run)
            assert state in ("SCHEDULED", "PENDING", "RUNNING"), f"the flow run ended {state} while waiting for {what}"
            next_check = time.monotonic() + 2
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout}s for {what}")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _tree(pid: int) -> list[int]:
    kids, tree, frontier = _children(), [pid], [pid]
    while frontier:
        for c in kids.get(frontier.pop(), []):
            tree.append(c)
            frontier.append(c)
    return tree


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _sigkill_worker(worker) -> list[int]:
    """SIGKILL the worker's process group, then any process of its tree outside the group (a lost machine);
    returns the PIDs of the tree that were outside the group."""
    tree = _tree(worker.pid)
    outside = []
    for pid in tree:
        try:
            if os.getpgid(pid) != worker.pid:
                outside.append(pid)
        except ProcessLookupError:
            pass
    os.killpg(worker.pid, signal.SIGKILL)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.wait(timeout=10)
    _wait_for(lambda: not any(_alive(p) for p in tree), 10, "the killed processes to exit")
    return outside


@contextmanager
def _worker(env: dict, log: Path):
    with prefect_worker(env, POOL, log) as proc:
        try:
            yield proc
        finally:
            for pid in _tree(proc.pid)[1:]:  # children left by a kill that did not happen (a failed wait)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _finished_shard_urls(store: Path) -> set[str]:
    """URLs of the img2dataset shards finished so far (a stats file is written once a shard is complete)."""
    urls: set[str] = set()
    for stats in store.glob("_work/curate/download/*/*/shards/*_stats.json"):
        urls |= set(pd.read_parquet(stats.parent / f"{stats.name.split('_')[0]}.parquet", columns=["url"])["url"])
    return urls


def _latest_checkpoint(store: Path):
    from sd_distill.distill.hooks.checkpoint import latest_checkpoint

    for checkpoints in store.glob("_work/distill/phase-*/*/phase/checkpoints"):
        if (last := latest_checkpoint(checkpoints)) is not None:
            return last
    return None


def _manifests(store: Path, stage_glob: str) -> list[dict]:
    return [json.loads(m.read_text()) for m in sorted(store.glob(f"{stage_glob}/*/manifest.json"))]


def test_sigkill_worker_mid_download_and_mid_training_then_rerun_completes(tmp_path):
    home, store = tmp_path / "prefect-home", tmp_path / "store"
    home.mkdir()
    t0 = time.monotonic()
    mark = lambda what: print(f"{time.monotonic() - t0:6.1f}s {what}")  # noqa: E731 - where the time goes (-s)
    with hostile_server(max_seconds=900, slow_good_s=0.2) as srv, prefect_server(home) as (api_url, _, env):
        urls = [srv.url("slowgood", str(i)) for i in range(N - 1)] + [srv.url("404", "x")]
        url_list = tmp_path / "urls.csv"
        pd.DataFrame({"url": urls, "caption": [f"a colour field {i}" for i in range(N)]}).to_csv(url_list, index=False)
        path = lambda url: url.split(str(srv.server_address[1]), 1)[1]  # noqa: E731 - URL -> counted path
        params = _params(url_list, store)
        # a worker polls every second (default 10 s): a run created just after its first poll starts at once
        env.update(CAD_CODE_DIR=str(REPO), CAD_CPU_POOL=POOL, CAD_GPU_POOL=POOL, OMP_NUM_THREADS="1",
                   PREFECT_WORKER_QUERY_SECONDS="1")
        mark("server up")
        prefect_cli(env, "work-pool", "create", POOL, "--type", "process")
        out = prefect_cli(env, "--no-prompt", "deploy", "--name", "curate-and-distill/demo", "--prefect-file", "deploy/prefect.yaml")
        assert "curate-and-distill/demo" in out
        mark("deployed")

        # 1. mid-download: img2dataset has finished at least one shard, not all of them
        with _worker(env, home / "worker-1.log") as worker:
            run1 = _start(api_url, params)
            _wait_for(lambda: _finished_shard_urls(store), 180, "the first finished img2dataset shard", (api_url, run1))
            outside = _sigkill_worker(worker)
        mark(f"killed mid-download (processes outside the worker's group: {outside})")
        finished = _finished_shard_urls(store)
        assert 1 <= len(finished) // SHARD < N // SHARD and not _manifests(store, "curate/download"), finished
        assert list(store.glob("curate/download/*.tmp-*")), "the killed build left its temporary folder"
        after_kill1 = dict(srv.requests)
        assert all(after_kill1.get(path(u)) == 1 for u in finished), after_kill1

        # 2. rerun; mid-training: a checkpoint exists, the phase is not finished
        with _worker(env, home / "worker-2.log") as worker:
            run2 = _start(api_url, params)
            _wait_for(lambda: _latest_checkpoint(store), 300, "a training checkpoint", (api_url, run2))
            outside = _sigkill_worker(worker)
        mark(f"killed mid-training (processes outside the worker's group: {outside})")
        last = _latest_checkpoint(store)
        assert last is not None, "training finished (its work folder is gone) before the kill"
        step = int(last.name.split("-")[1])
        assert CHECKPOINT_EVERY <= step < MAX_STEPS and not _manifests(store, "distill/phase-*"), last
        after_kill2 = dict(srv.requests)
        cache_manifest = next(store.glob("distill/cache/*/manifest.json"))
        cache_mtime = cache_manifest.stat().st_mtime_ns

        # 3. rerun on a new worker: it completes
        with _worker(env, home / "worker-3.log"):
            run3 = _start(api_url, params)
            _wait_for(lambda: _state(api_url, run3) in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), 400,
                      "the third run to end", poll=0.5)
            assert _state(api_url, run3) == "COMPLETED", (home / "worker-3.log").read_text()[-4000:]
        mark("third run completed")
        # the killed runs never finished (nothing reported their end: they stay Running on the server)
        killed = [_state(api_url, r) for r in (run1, run2)]
        assert "COMPLETED" not in killed, killed
        mark(f"killed runs: {killed}")
        final = dict(srv.requests)

    # finished shards were never fetched again; every URL was fetched; the third run fetched nothing
    assert all(final.get(path(u)) == 1 for u in finished), (finished, final)
    assert all(final.get(path(u), 0) >= 1 for u in urls), final
    assert final == after_kill2, "the third run downloaded again"
    # training resumed from the last checkpoint and ran only the remaining steps; the cache was reused
    [phase] = _manifests(store, "distill/phase-*")
    assert phase["counts"]["resumed_from"].endswith(last.name), phase["counts"]
    assert phase["counts"]["steps_this_run"] == MAX_STEPS - step and phase["counts"]["steps"] == MAX_STEPS
    assert cache_manifest.stat().st_mtime_ns == cache_mtime
    # curate accounting: rows in = kept + rejected, from the manifests and from the files
    [download] = _manifests(store, "curate/download")
    assert download["counts"]["in"] == N == download["counts"]["downloaded"] + download["counts"]["rejected"]
    [shards] = _manifests(store, "curate/shards")
    c = shards["counts"]
    assert c["in"] == N == c["kept"] + c["rejected"], c
    shard_dir = next(store.glob("curate/shards/*/manifest.json")).parent
    kept = sum(len(pd.read_parquet(p, columns=["key"])) for p in shard_dir.glob("part-*.parquet"))
    rejected = len(pd.read_parquet(shard_dir / "rejects.parquet"))
    assert (kept, rejected) == (c["kept"], c["rejected"]) and kept >= 1
    assert (store / "latest-summary.md").exists()
    # nothing of the killed builds is left: no temporary stage folders, no work files
    assert [p.name for p in store.glob("*/*/*.tmp-*")] == []
    assert [str(p) for p in (store / "_work").rglob("*") if p.is_file()] == []
