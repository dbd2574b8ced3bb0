"""Follow a flow run in the terminal: its log lines and those of every subflow, until it ends.

Starts a run of a deployment (or takes a flow run id), then polls the Prefect API and prints each new log
line of level INFO and above as ``HH:MM:SS <flow> | <message>``: the stages building, reusing the
store or served from Prefect's cache, their progress lines (``<stage>: done/total (rate/s, ETA) ...``,
training steps with the loss). Exits 0 when the run completes, 1 when it ends in any other state.
Ctrl-C stops the watching, not the run. ``make demo`` runs it; by hand::

    python scripts/watch_run.py curate-and-distill/demo
    python scripts/watch_run.py curate-and-distill/default --params "$(cat my-run.json)"
    python scripts/watch_run.py --flow-run <flow run id>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
from datetime import timedelta
from typing import Callable
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterLevel,
    LogFilterTimestamp,
)
from prefect.client.schemas.sorting import LogSort

# Engine bookkeeping that says nothing a stage line does not; the Prefect UI keeps every line.
NOISE = re.compile(r"Created task run|Created subflow run|Executing '|Submitted task run|Opening process|"
                   r"Completed submission|Downloading flow code|Running \d+ deployment pull step|"
                   r"Executing deployment step|Deployment step '|All deployment steps completed")
# Logs reach the API in batches, from several processes: each poll looks this far back (lines are deduplicated).
OVERLAP = timedelta(seconds=30)
PAGE = 200


def describe(message: str, task_name: str | None) -> str:
    """A log message as the terminal shows it: a task run's final state names the task, a cache hit says so."""
    if task_name and message.startswith("Finished in state"):
        if message.startswith("Finished in state Cached"):
            return f"{task_name}: served from Prefect's cache (the stage is in the store)"
        return f"{task_name}: {message[0].lower()}{message[1:]}"
    return message


class RunLogs:
    """The log lines of one flow run and all its subflows (any depth), each returned once, oldest first."""

    def __init__(self, client: PrefectClient, flow_run_id: UUID, level: int = logging.INFO):
        self.client = client
        self.root = flow_run_id
        self.level = level
        self.flow_names: dict[UUID, str] = {}  # flow run id -> its flow's name
        self._flows: dict[UUID, str] = {}  # flow id -> name
        self._tasks: dict[UUID, str] = {}  # task run id -> name
        self._seen: set[UUID] = set()
        self._newest = None

    async def _flow_name(self, flow_id: UUID) -> str:
        if flow_id not in self._flows:
            self._flows[flow_id] = (await self.client.read_flow(flow_id)).name
        return self._flows[flow_id]

    async def _find_runs(self) -> None:
        """The root run and every run below it (subflows of subflows: curate -> curate-partitions)."""
        if self.root not in self.flow_names:
            run = await self.client.read_flow_run(self.root)
            self.flow_names[run.id] = await self._flow_name(run.flow_id)
        parents = list(self.flow_names)
        while parents:
            children = await self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=parents)))
            parents = [run.id for run in children if run.id not in self.flow_names]
            for run in children:
                if run.id not in self.flow_names:
                    self.flow_names[run.id] = await self._flow_name(run.flow_id)

    async def _task_name(self, task_run_id: UUID | None) -> str | None:
        if task_run_id is None:
            return None
        if task_run_id not in self._tasks:
            try:
                self._tasks[task_run_id] = (await self.client.read_task_run(task_run_id)).name
            except Exception:  # a name is a nicety
                self._tasks[task_run_id] = str(task_run_id)[:8]
        return self._tasks[task_run_id]

    async def new_lines(self) -> list[str]:
        """Every line logged since the last call, formatted; engine noise left out."""
        await self._find_runs()
        after = self._newest - OVERLAP if self._newest is not None else None
        logs, offset = [], 0
        while True:
            page = await self.client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(self.flow_names)),
                                     level=LogFilterLevel(ge_=self.level),
                                     timestamp=LogFilterTimestamp(after_=after) if after else None),
                sort=LogSort.TIMESTAMP_ASC, limit=PAGE, offset=offset)
            logs += page
            if len(page) < PAGE:
                break
            offset += PAGE
        lines = []
        for log in logs:
            if log.id in self._seen:
                continue
            self._seen.add(log.id)
            self._newest = max(self._newest, log.timestamp) if self._newest else log.timestamp
            if NOISE.match(log.message):
                continue
            flow = self.flow_names.get(log.flow_run_id, "?")
            text = describe(log.message, await self._task_name(log.task_run_id))
            stamp = log.timestamp.astimezone().strftime("%H:%M:%S")
            lines.extend(f"{stamp} {flow:<18} | {part}" for part in text.splitlines() or [""])
        return lines


async def watch(flow_run_id: UUID, out: Callable[[str], None] = print, interval: float = 2.0) -> str:
    """Print the run's lines until it is final (and its last lines are in); returns its state's name."""
    async with get_client() as client:
        logs = RunLogs(client, flow_run_id)
        while True:
            run = await client.read_flow_run(flow_run_id)
            final = run.state is not None and run.state.is_final()
            if final:  # loggers flush their last batch after the state is set
                await asyncio.sleep(interval)
            for line in await logs.new_lines():
                out(line)
            if final:
                if not run.state.is_completed() and run.state.message:
                    out(run.state.message)
                return run.state.name
            await asyncio.sleep(interval)


async def start_run(deployment: str, parameters: dict) -> UUID:
    async with get_client() as client:
        dep = await client.read_deployment_by_name(deployment)
        run = await client.create_flow_run_from_deployment(dep.id, parameters=parameters)
        print(f"flow run {run.name} ({run.id}) of {deployment}", flush=True)
        return run.id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/watch_run.py", description=__doc__.splitlines()[0])
    p.add_argument("deployment", nargs="?", help="<flow>/<deployment> to start a run of")
    p.add_argument("--params", default="{}", help="the run's parameters as JSON")
    p.add_argument("--flow-run", type=UUID, help="watch this flow run instead of starting one")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    args = p.parse_args(argv)
    if (args.deployment is None) == (args.flow_run is None):
        p.error("give a deployment or --flow-run")
    flow_run_id = args.flow_run or asyncio.run(start_run(args.deployment, json.loads(args.params)))
    try:
        state = asyncio.run(watch(flow_run_id, lambda line: print(line, flush=True), args.interval))
    except KeyboardInterrupt:
        print(f"stopped watching; flow run {flow_run_id} goes on (the Prefect UI has it)")
        return 130
    print(f"flow run {flow_run_id}: {state}")
    return 0 if state == "Completed" else 1


if __name__ == "__main__":
    sys.exit(main())
