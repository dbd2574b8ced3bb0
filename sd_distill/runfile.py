"""Run files: a whole run of the ``curate-and-distill`` DAG in one YAML / JSON file, validated on load.

Top-level keys (all optional): ``curate`` (CurateParams), ``distill`` (DistillParams), ``evaluate``
(EvaluateParams; absent = the embedded toy world's held-out prompts), ``toy_eval_prompts`` (int),
``store_root`` (str), ``stage_deployments`` (StageDeployments), ``extra_students`` (student name ->
DistillParams, same teacher) and ``push_to_hub`` (HubParams, off by default). Unknown keys and invalid values fail on load, naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict

from sd_distill.curate.config import CurateParams
from sd_distill.distill.config import DistillParams, check_extra_students
from sd_distill.distill.hub import HubParams
from sd_distill.evaluate.config import EvaluateParams


class StageDeployments(BaseModel):
    """Where each stage runs: None = inline in this flow run; "<flow>/<deployment>" = its own deployment."""

    model_config = ConfigDict(extra="forbid")

    curate: Optional[str] = None  # e.g. "curate/default" on a CPU pool
    distill: Optional[str] = None  # e.g. "distill/gpu" on a GPU pool (deploy/prefect.yaml)
    evaluate: Optional[str] = None  # e.g. "evaluate/gpu"


def load_run_file(path: str | Path) -> dict[str, Any]:
    """A whole run in one YAML / JSON file, validated against the flow's parameter models.

    Keys: curate, distill, evaluate, store_root, stage_deployments, extra_students, push_to_hub (all optional). Unknown keys and
    invalid values fail here, naming the field, before anything runs.
    """
    text = Path(path).read_text()
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a run file holds a mapping of curate/distill/evaluate/store_root/stage_deployments")
    known = {"curate": CurateParams, "distill": DistillParams, "evaluate": EvaluateParams,
             "stage_deployments": StageDeployments, "store_root": str, "toy_eval_prompts": int,
             "extra_students": dict, "push_to_hub": HubParams}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; valid: {sorted(known)}")
    params: dict[str, Any] = {}
    for key, value in raw.items():
        model = known[key]
        if model is dict:  # extra_students: name -> DistillParams
            if not isinstance(value or {}, dict):
                raise ValueError(f"{path}: extra_students maps a student name to its distill parameters")
            params[key] = {name: DistillParams.model_validate(v or {}) for name, v in (value or {}).items()}
        else:
            params[key] = model(value) if model in (str, int) else model.model_validate(value or {})
    check_extra_students(params.get("distill", DistillParams()), params.get("extra_students", {}))
    return params
