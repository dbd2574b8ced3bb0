"""The distill flow: curated shards -> latent cache -> one training phase per stage -> student pipeline.

Wraps ``sd_distill.distill`` (no training code here). Each phase of a multi-phase method
(w-conditioned + progressive halvings) is its own stage, so a failed halving reruns alone and a
retried run resumes from the failed phase's last checkpoint. Run locally::

    python -m flows.distill                      # toy teacher on the newest curated shards in the store
    prefect deployment run distill/gpu -p curated=/path/to/store/curate/shards/<key>
"""

from __future__ import annotations

from prefect import flow

from flows._common import curated_manifest, quiet_library_environment, resolve_store_root
from sd_distill.distill.config import DistillParams
from sd_distill.distill.methods import phase_params, plan_phases
from sd_distill.store import Manifest
from tasks import distill as t


@flow(name="distill", persist_result=True, log_prints=True)
def distill(params: DistillParams = DistillParams(), curated: str = "latest", store_root: str = "") -> Manifest:
    """Distill ``params.teacher`` on a curated stage folder (``latest`` = newest in the store)."""
    quiet_library_environment()
    root = resolve_store_root(store_root)
    shards = curated_manifest(curated, root)
    cache = t.build_latent_cache(params, [shards], root)
    phases = []
    for phase in plan_phases(params.method):
        previous = phases[-1:]  # a progressive chain: the previous phase's student teaches this one
        phases.append(t.train_phase(phase_params(params, phase), [cache, *previous], root, suffix=phase.name))
    student = t.export_student(params, [shards, cache, *phases], root)
    t.publish_student(student)
    return student


if __name__ == "__main__":
    print(distill().uri)
