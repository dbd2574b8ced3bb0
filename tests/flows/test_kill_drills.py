"""Kill drills: SIGKILL the processes that do the work, mid-way, then run the same entry point again.

- Download: the img2dataset child (``python -m sd_distill.curate.img2dataset_child``) and its spawned workers
  are killed after the first shard is finished; rerunning ``download_images`` with the same work folder
  (what a retried Prefect stage does) completes, never fetches a finished shard's URLs again (the loopback
  server counts requests), and every row is kept or rejected.
- Training: ``python -m sd_distill.distill.train ... --resume`` (the command ``tasks.distill.train_phase``
  runs) is killed after a checkpoint; the same command again resumes from that checkpoint and finishes.
  That a resumed run ends with the weights of an uninterrupted one is pinned in-process by
  ``tests/distill/test_trainer.py`` and for two processes by ``tests/distill/test_multiprocess.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from sd_distill.curate.collect import collect_sources
from sd_distill.curate.config import CurateParams, DownloadParams, SourceSpec
from sd_distill.curate.download import DOWNLOADED_FILE, download_images
from sd_distill.curate.schema import read_rejects
from tests._fixtures_distill import tiny_params
from tests._fixtures_hostile import hostile_server

pytestmark = pytest.mark.slow


def _process_tree(match: str) -> list[int]:
    """PIDs of processes whose command line contains ``match``, and all their descendants."""
    parents: dict[int, int] = {}
    roots = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[int(d.name)] = ppid
        if match in cmd:
            roots.append(int(d.name))
    tree, frontier = set(roots), list(roots)
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return sorted(tree)


def _wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise TimeoutError(f"waited {timeout}s for {what}")


def test_sigkill_mid_download_then_rerun_completes_without_refetching_finished_shards(tmp_path):
    n, shard = 9, 3
    with hostile_server(max_seconds=150, slow_good_s=0.3) as srv:
        urls = [srv.url("slowgood", str(i)) for i in range(n - 1)] + [srv.url("404", "x")]
        lst = tmp_path / "list.csv"
        pd.DataFrame({"url": urls, "caption": [f"row {i}" for i in range(n)]}).to_csv(lst, index=False)
        params = CurateParams(
            sources=[SourceSpec(kind="url_list", path=str(lst))],
            download=DownloadParams(image_size=16, shard_size=shard, threads=1, retries=0, timeout=10,
                                    allowed_networks=["127.0.0.1/32"]),
        )
        collect_sources(params, tmp_path / "collect")
        work = tmp_path / "work"
        first: dict = {}

        def run_first():
            try:
                download_images(params, tmp_path / "collect", tmp_path / "first", work_dir=work)
            except Exception as e:  # the kill makes img2dataset exit with -9
                first["error"] = e

        t = threading.Thread(target=run_first, daemon=True)
        t.start()
        done = _wait_for(lambda: sorted(work.glob("*/shards/*_stats.json")), 90, "the first finished shard")
        pids = _process_tree(f"sd_distill.curate.img2dataset_child {work}")
        assert pids, "the img2dataset child was not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        t.join(30)
        finished = {int(p.name.split("_")[0]) for p in work.glob("*/shards/*_stats.json")}
        assert "status -9" in str(first.get("error")), first
        assert 1 <= len(finished) < n // shard and len(done) >= 1, finished
        before = dict(srv.requests)

        counts = download_images(params, tmp_path / "collect", tmp_path / "second", work_dir=work)
        after = dict(srv.requests)

    path = lambda i: urls[i].split(str(srv.server_address[1]), 1)[1]  # noqa: E731
    for s in range(n // shard):
        for i in range(s * shard, (s + 1) * shard):
            if s in finished:  # fetched once, before the kill, never again
                assert before.get(path(i)) == after.get(path(i)) == 1, (s, i, before, after)
            else:
                assert after.get(path(i), 0) > before.get(path(i), 0), (s, i, before, after)
    kept = pd.read_parquet(tmp_path / "second" / DOWNLOADED_FILE)
    rejects = read_rejects(tmp_path / "second")
    assert counts["in"] == n == len(kept) + len(rejects)  # rows in = kept + rejected
    assert len(kept) == n - 1 and rejects["reason"].tolist() == ["http_4xx"]
    assert _process_tree(f"sd_distill.curate.img2dataset_child {work}") == []


def _train_cmd(params_file: Path, cache: Path, out: Path) -> list[str]:
    from tasks.distill import launcher

    return launcher(1) + ["sd_distill.distill.train", "--params", str(params_file), "--phase", "0",
                          "--cache", str(cache), "--out", str(out), "--resume"]


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_sigkill_mid_training_then_rerun_resumes_from_the_last_checkpoint(tiny_teacher, tiny_cache, tmp_path):
    from sd_distill.distill.hooks.checkpoint import latest_checkpoint

    params_file = tmp_path / "params.json"
    params_file.write_text(tiny_params(tiny_teacher, max_steps=8, checkpoint_every=2).model_dump_json())
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(params_file, tiny_cache, out), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            event = json.loads(line)
            seen.append(event)
            if event.get("event") == "progress" and event["step"] >= 3:
                proc.send_signal(signal.SIGKILL)  # after the step-2 checkpoint, mid-run
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, seen[-3:]
    last = latest_checkpoint(out / "checkpoints")
    assert last is not None and not (out / "unet").exists()
    step = int(last.name.split("-")[1])
    assert 2 <= step < 8

    again = subprocess.run(_train_cmd(params_file, tiny_cache, out), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    done = _events(again.stdout)[-1]
    assert done["event"] == "done" and done["resumed_from"].endswith(last.name) and done["steps_this_run"] == 8 - step and done["steps"] == 8
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
