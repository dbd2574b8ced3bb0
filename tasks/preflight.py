"""The parent flow's first task: every model reference and input file of the run checked before any stage runs."""

from __future__ import annotations

from typing import Optional

from prefect import task

from sd_distill import preflight as lib
from sd_distill.curate.config import CurateParams
from sd_distill.distill.config import DistillParams
from sd_distill.evaluate.config import EvaluateParams


@task(name="preflight", retries=0, cache_policy=None, log_prints=True)
def preflight(curate: Optional[CurateParams], distill: Optional[DistillParams],
              evaluate: Optional[EvaluateParams]) -> None:
    """Raise ``PreflightError`` naming every problem; a stage given as ``None`` runs elsewhere and is not checked
    here (its deployment's workers hold its files)."""
    lib.check_run(curate, distill, evaluate)
    print("preflight: every model reference and input file of this run resolves")
