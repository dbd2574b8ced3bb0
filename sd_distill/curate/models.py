"""The curate stage's models, loaded one at a time in a process.

Partitioned runs on a thread pool or a Dask cluster with thread workers load several models at once in
one process. transformers builds a model under a process-wide "empty weights" (meta device) context, so a
second model constructed by another thread meanwhile ends up with meta tensors ("Cannot copy out of meta
tensor"). Loading under one lock serializes only the loads; scoring and captioning still run in parallel.
"""

from __future__ import annotations

import threading

from sd_distill.curate.config import CurateParams

_LOAD_LOCK = threading.Lock()


def hps_scorer(params: CurateParams):
    """``load_hps_scorer`` for ``params.filter`` (the scorer of filtering and of the caption choice)."""
    from sd_distill.scoring.hps import load_hps_scorer  # deferred: heavy (torch, torchvision: scoring.hps)

    f = params.filter
    with _LOAD_LOCK:
        return load_hps_scorer(f.hps_model, version=f.hps_version, device=f.device)


def captioner(params: CurateParams):
    """``load_captioner`` for ``params.caption``."""
    from sd_distill.captioning.blip import load_captioner  # deferred: heavy (torch: captioning.blip)

    c = params.caption
    with _LOAD_LOCK:
        return load_captioner(c.captioner, prompt=c.prompt, max_new_tokens=c.max_new_tokens, device=c.device)
