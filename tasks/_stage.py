"""The one mechanism every stage task shares: stage store + Prefect cache + progress artifact.

A stage task is a thin wrapper around one library call ``fn(out_dir, inputs, progress) -> counts``
(``inputs``: local folders of the upstream stages).
``stage_task`` turns it into a Prefect task whose cache key *is* the stage-store key, so:

- a rerun with the same inputs shows a ``Cached`` state and costs nothing;
- a retried flow run resumes at the first stage whose folder is not in the store;
- if the store folder was deleted, the cache key is varied and the stage is rebuilt
  (Prefect never hands back a manifest whose files are gone);
- two identical builds at once: the store's lock lets one build, the other reuses its folder.
"""

from __future__ import annotations

import contextvars
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Sequence

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CacheKeyFnPolicy

from sd_distill.store import Manifest, StageStore, stage_key

StageFn = Callable[..., dict]

# Transient failures worth retrying (network, I/O); logic errors and missing files fail at once.
TRANSIENT = (OSError, TimeoutError, ConnectionError)
PERMANENT = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except PERMANENT:
        return False
    except TRANSIENT:
        return True
    except BaseException:
        return False
    return False


# A stage's progress line in the run log: at most one per LOG_EVERY_S seconds, plus its first and last item.
LOG_EVERY_S = 10.0


def progress_line(stage: str, done: int, total: int, rate: float | None, message: str = "") -> str:
    """``<stage>: <done>/<total> (<rate>/s, ETA <eta>) <message>``; rate and ETA only once they are known."""
    line = f"{stage}: {done}/{total}" if total else f"{stage}: {done}"
    if rate:
        eta = f", ETA {_duration((total - done) / rate)}" if total and done < total else ""
        line += f" ({rate:.3g}/s{eta})"
    return f"{line} {message}".rstrip()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressRate:
    """When to log a report, and the items per second since the last logged one (a training run that speeds
    up once a competing process ends gets an honest ETA). A new ``total`` or a count that went back starts
    over: a library call may report several loops through one callback."""

    def __init__(self, every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self._mark: tuple[float, int] | None = None  # (clock, done) at the last logged report
        self._total = None
        self._done = 0

    def update(self, done: int, total: int) -> tuple[float | None, bool]:
        """Record a report; returns (items per second or None, whether to log this one)."""
        now = self.clock()
        restart = self._mark is None or total != self._total or done < self._done
        if restart:
            self._mark, self._total = (now, done), total
        self._done = done
        t0, d0 = self._mark
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else None
        last = bool(total) and done >= total
        log = restart or last or now - t0 >= self.every_s
        if log:
            self._mark = (now, done)
        return rate, log


class ProgressArtifact:
    """A ProgressFn that updates one Prefect progress artifact (throttled to one call a second) and logs
    ``progress_line`` through the run logger (throttled to ``LOG_EVERY_S``), so the terminal follows it too."""

    def __init__(self, description: str, stage: str | None = None):
        self.description = description
        self.stage = stage or description
        self.id = None
        self._last = 0.0
        self._rate = ProgressRate()
        self._logger = get_run_logger()  # captured here: library code may report from its own threads

    def __call__(self, done: int, total: int, message: str = "") -> None:
        rate, log = self._rate.update(done, total)
        if log:
            self._logger.info("%s", progress_line(self.stage, done, total, rate, message))
        now = time.monotonic()
        final = total and done >= total
        if not final and now - self._last < 1.0:
            return
        self._last = now
        pct = 100.0 * done / total if total else 0.0
        try:
            if self.id is None:
                self.id = create_progress_artifact(progress=pct, description=self.description)
            else:
                update_progress_artifact(self.id, progress=pct, description=f"{self.description}: {message}"[:500])
        except Exception as exc:  # progress must never fail the stage
            self._logger.debug("progress artifact update failed: %s", exc)


def _key_for(ctx, stage: str, code_version: str, key_of: Callable[[Any], Any], parameters: dict[str, Any]) -> str:
    """Prefect's cache key for a stage task: the stage-store key (plus the store's location).

    When Prefect holds a cached result but the stage folder is gone (someone deleted it),
    the key is varied so the task runs and rebuilds the folder at its content-addressed path.
    """
    name = stage_name(stage, parameters)
    store = StageStore(parameters["store_root"])
    key = stage_key(name, key_of(parameters["params"]), parameters.get("upstream") or (), code_version)
    cache_key = f"{name}/{key}@{store.url}".replace("/", "_").replace(":", "_")
    if store.find(name, key) is None:
        try:
            if ctx.result_store.exists(cache_key):
                return f"{cache_key}-rebuild-{time.time_ns()}"
        except Exception:
            pass
    return cache_key


def stage_name(stage: str, parameters: dict[str, Any]) -> str:
    """Stage names may carry a suffix chosen at call time (``distill/phase-2``)."""
    suffix = parameters.get("suffix")
    return f"{stage}-{suffix}" if suffix else stage


def _injected_fault(stage: str) -> None:
    """Fault drills: with ``$CAD_FAULT_DIR`` set, a file named after the stage fails it once.

    ``touch $CAD_FAULT_DIR/distill-phase-0`` makes the next build of that stage raise (and removes
    the file), so a retry of the flow run shows the resume behaviour. Off unless the variable is set.
    """
    fault_dir = os.environ.get("CAD_FAULT_DIR")
    if not fault_dir:
        return
    marker = Path(fault_dir) / stage.replace("/", "-")
    try:
        marker.unlink()
    except FileNotFoundError:
        return
    raise RuntimeError(f"injected fault in stage {stage} ({marker} was present)")


_CURRENT: contextvars.ContextVar[tuple[str, str, str]] = contextvars.ContextVar("cad_stage")


def work_dir() -> Path:
    """A persistent scratch folder for the stage being built (checkpoints survive a failed attempt).

    The stage folder itself is temporary until it completes; what must outlive a crash (training
    checkpoints, img2dataset's partial shards) goes here: ``<store>/_work/<stage>/<key>`` for local
    stores, ``~/.cache/curate-and-distill/work/...`` for remote ones.
    """
    stage, key, root = _CURRENT.get()
    base = Path(root) if "://" not in root else Path.home() / ".cache" / "curate-and-distill"
    path = base / "_work" / stage / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_stage(
    stage: str,
    params: Any,
    upstream: Sequence[Manifest],
    store_root: str,
    fn: StageFn,
    code_version: str,
    description: str,
) -> Manifest:
    """Run ``fn(out_dir, inputs, progress)`` into the store unless the stage is already there."""
    logger = get_run_logger()
    store = StageStore(store_root)
    with store.build(stage, params, upstream, code_version) as b:
        if b.reused:
            logger.info("%s: reusing %s", stage, b.manifest.uri)
            return b.manifest
        logger.info("%s: building %s", stage, b.key)
        _injected_fault(stage)
        token = _CURRENT.set((stage, b.key, store.url))
        with ExitStack() as stack:
            stack.callback(_CURRENT.reset, token)
            inputs = [stack.enter_context(store.local_copy(m)) for m in upstream]
            counts = fn(b.path, inputs, ProgressArtifact(description, stage)) or {}
        b.counts.update(counts)
    logger.info("%s: stored %s (%s)", stage, b.manifest.uri, ", ".join(f"{k}={v}" for k, v in b.counts.items() if not isinstance(v, (dict, list))))
    return b.manifest


def stage_task(
    stage: str,
    *,
    code_version: str = "1",
    retries: int = 2,
    description: str | None = None,
    key_of: Callable[[Any], Any] = lambda params: params,
    **task_kwargs,
):
    """Decorator: ``def body(params, upstream, store_root[, suffix]) -> fn`` becomes a cached stage task.

    The body returns the library call as ``fn(out_dir, inputs, progress) -> counts``; this wrapper does the rest.
    ``key_of(params)`` picks the part of the parameters the stage depends on (so changing the filter
    threshold does not redo the download).
    """

    def decorate(body: Callable[..., StageFn]):
        policy = CacheKeyFnPolicy(cache_key_fn=lambda ctx, parameters: _key_for(ctx, stage, code_version, key_of, parameters))

        @task(
            name=stage.replace("/", "-"),
            cache_policy=policy,
            persist_result=True,
            retries=retries,
            retry_delay_seconds=2,
            retry_condition_fn=_retry_transient,
            **task_kwargs,
        )
        def run(params: Any, upstream: list[Manifest], store_root: str, suffix: str | None = None) -> Manifest:
            fn = body(params, upstream, store_root, suffix) if suffix is not None else body(params, upstream, store_root)
            name = stage_name(stage, {"suffix": suffix})
            return build_stage(name, key_of(params), upstream, store_root, fn, code_version, description or name)

        run.__doc__ = body.__doc__
        return run

    return decorate

