"""Progress reporting for the training loop: a ProgressFn call and one JSON line on stdout per report.

The JSON lines (``{"event": "progress", "step": .., "max_steps": .., "loss": .., "samples_per_s": ..}``)
are what the Prefect task parses from the training subprocess' stdout to update its progress artifact.
Only the main process reports.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Optional, TextIO

from sd_distill.progress import ProgressFn, report


def progress_event(step: int, max_steps: int, loss: float, samples_per_s: float, **extra) -> dict:
    """The progress record printed as one JSON line."""
    event = {"event": "progress", "step": step, "max_steps": max_steps, "loss": loss, "samples_per_s": samples_per_s}
    event.update(extra)
    return event


class ProgressHook:
    def __init__(
        self,
        max_steps: int,
        samples_per_step: int,
        progress: Optional[ProgressFn] = None,
        every: int = 1,
        stream: Optional[TextIO] = None,
        enabled: bool = True,
    ):
        self.max_steps = max_steps
        self.samples_per_step = samples_per_step
        self.progress = progress
        self.every = max(1, every)
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._steps_since = 0

    def on_step(self, step: int, loss: float, **extra) -> Optional[dict]:
        """Call after optimizer step ``step`` (1-based); returns the event when one was emitted."""
        self._steps_since += 1
        if not self.enabled or (step % self.every and step != self.max_steps):
            return None
        now = time.perf_counter()
        rate = self._steps_since * self.samples_per_step / max(now - self._t0, 1e-9)
        self._t0, self._steps_since = now, 0
        event = progress_event(step, self.max_steps, float(loss), round(rate, 3), **extra)
        print(json.dumps(event), file=self.stream, flush=True)
        report(self.progress, step, self.max_steps, f"loss {loss:.4g}, {rate:.2f} samples/s")
        return event
