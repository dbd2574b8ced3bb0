"""Run a command (e.g. ``accelerate launch ...``) and stream its output into the Prefect run logs.

Lines that are JSON objects with ``"event": "progress"`` go to the progress callback (the artifact and
the rate-limited ``<stage>: <step>/<max_steps> ... loss=..`` line) and to the log at DEBUG; every other
line goes to the task run's log at INFO, so training logs appear in the flow run.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Callable, Sequence

from prefect import get_run_logger


def run_streaming(cmd: Sequence[str], progress: Callable[[int, int, str], None] | None = None,
                  env: dict[str, str] | None = None, cwd: str | None = None) -> list[dict]:
    """Run ``cmd``; return the JSON events it printed. Raises RuntimeError with the log tail on failure."""
    logger = get_run_logger()
    logger.info("running: %s", " ".join(cmd))
    events: list[dict] = []
    tail: list[str] = []
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if not line:
            continue
        tail = (tail + [line])[-40:]
        event = None
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
        if isinstance(event, dict) and "event" in event:
            events.append(event)
            if event["event"] == "progress" and progress is not None:
                msg = ", ".join(["training steps"] + [
                    f"{k}={event[k]:.4g}" if isinstance(event[k], float) else f"{k}={event[k]}"
                    for k in ("loss", "samples_per_s", "lr") if k in event])
                progress(int(event.get("step", 0)), int(event.get("max_steps", 0)), msg)
                logger.debug("%s", line)
            else:
                logger.info("%s", line)
        else:
            logger.info("%s", line)
    code = proc.wait()
    if code != 0:
        raise RuntimeError(f"command failed with exit code {code}: {' '.join(cmd)}\n" + "\n".join(tail[-20:]))
    return events
