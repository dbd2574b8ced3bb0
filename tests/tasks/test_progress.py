"""What the terminal shows of a run: the stages' rate-limited progress lines, and the watcher that collects
the log lines of a flow run and its subflows from the Prefect API."""

import asyncio
import importlib.util
import logging
from pathlib import Path

import pytest

from tasks._stage import ProgressRate, progress_line

ROOT = Path(__file__).resolve().parents[2]


def test_progress_line_format():
    assert progress_line("curate/score", 0, 48, None, "HPS v2.1 scoring") == "curate/score: 0/48 HPS v2.1 scoring"
    assert progress_line("curate/score", 12, 48, 4.0, "HPS") == "curate/score: 12/48 (4/s, ETA 9s) HPS"
    assert progress_line("distill/phase-0", 40, 1000, 0.5, "training steps, loss=0.0123") == \
        "distill/phase-0: 40/1000 (0.5/s, ETA 32m00s) training steps, loss=0.0123"
    assert progress_line("distill/cache", 48, 48, 16.0) == "distill/cache: 48/48 (16/s)"  # done: no ETA
    assert progress_line("curate/sources", 3, 0, None) == "curate/sources: 3"  # total unknown


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_rate_logs_first_last_and_every_interval():
    clock = FakeClock()
    rate = ProgressRate(every_s=10.0, clock=clock)
    logged = []
    for step in range(0, 101):  # one item every 0.5 s
        r, log = rate.update(step, 100)
        if log:
            logged.append((step, r))
        clock.t += 0.5
    # the first report, one every 10 s (20 items), the last
    assert [s for s, _ in logged] == [0, 20, 40, 60, 80, 100]
    assert logged[0][1] is None and all(r == pytest.approx(2.0) for _, r in logged[1:])


def test_progress_rate_starts_over_on_a_new_count():
    clock = FakeClock()
    rate = ProgressRate(every_s=10.0, clock=clock)
    assert rate.update(0, 10) == (None, True)
    clock.t += 1
    assert rate.update(5, 10) == (5.0, False)
    clock.t += 1
    assert rate.update(1, 3) == (None, True)  # another loop through the same callback: its first item logs
    clock.t += 2
    assert rate.update(3, 3) == (1.0, True)  # the last item always logs


def test_progress_rate_is_the_rate_since_the_last_line():
    clock = FakeClock()
    rate = ProgressRate(every_s=10.0, clock=clock)
    rate.update(0, 1000)
    clock.t += 10
    assert rate.update(10, 1000) == (1.0, True)
    clock.t += 10
    assert rate.update(110, 1000) == (10.0, True)  # sped up: the ETA follows at once


def _watcher():
    spec = importlib.util.spec_from_file_location("watch_run", ROOT / "scripts" / "watch_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_describe_names_the_task_and_the_cache_hit():
    watch_run = _watcher()
    describe = watch_run.describe
    assert watch_run.NOISE.match("Running 1 deployment pull step(s)")
    assert not watch_run.NOISE.match("curate/download: 0/200 img2dataset shards 0/1")
    assert describe("Finished in state Cached(type=COMPLETED)", "curate-download-f22") == \
        "curate-download-f22: served from Prefect's cache (the stage is in the store)"
    assert describe("Finished in state Completed()", "distill-cache-1a2") == "distill-cache-1a2: finished in state Completed()"
    assert describe("curate/score: 3/8", "curate-score-9b1") == "curate/score: 3/8"


@pytest.mark.usefixtures("prefect_harness")
def test_watcher_collects_the_lines_of_the_run_and_its_subflows():
    # the suite's loggers stop below WARNING, so the lines here are warnings and the watcher asks for those

    from prefect import flow, get_run_logger, task
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    watch_run = _watcher()

    @task(name="leaf-task")
    def leaf():
        get_run_logger().warning("leaf: 1/1 done")

    @flow(name="watched-child")
    def child():
        get_run_logger().warning("child says hello")
        get_run_logger().info("child info line")  # below the level asked for
        leaf()

    @flow(name="watched-parent")
    def parent():
        get_run_logger().warning("parent starts")
        child()
        get_run_logger().warning("parent ends")

    state = parent(return_state=True)

    async def collect():
        await APILogHandler.aflush()  # the run's last batch of lines
        async with get_client() as client:
            logs = watch_run.RunLogs(client, state.state_details.flow_run_id, level=logging.WARNING)
            return await logs.new_lines(), await logs.new_lines()

    first, again = asyncio.run(collect())
    text = "\n".join(first)
    for expected in ("watched-parent     | parent starts", "watched-child      | child says hello",
                     "watched-child      | leaf: 1/1 done", "watched-parent     | parent ends"):
        assert expected in text
    assert "child info line" not in text
    assert [line.split(" | ")[1] for line in first].index("parent starts") < \
        [line.split(" | ")[1] for line in first].index("parent ends")
    assert again == []  # each line once
