"""The evaluate flow: DPM-Solver++ at 8/16/20 steps, FID / IS / CLIP on COCO-2017, HPSv2 on its benchmark.

Wraps ``sd_distill.evaluate``: one stage per model (images resumable per prompt batch, metrics,
latency, bootstrap replicates), then the report (table in the reference layout with 95% intervals over
prompts, student-minus-teacher paired differences, teacher-vs-student grids, metric plots) as files in the
store and as Prefect artifacts. A ModelSpec with ``sampler: ddim`` is its own stage (suffix ``<name>-ddim``). Run locally::

    python -m flows.evaluate                                  # toy teacher, toy prompts
    prefect deployment run evaluate/gpu -p models='[{"name": "sd15", "ref": "stable-diffusion-v1-5/stable-diffusion-v1-5"}]'
"""

from __future__ import annotations

from typing import Optional

from prefect import flow

from flows._common import quiet_library_environment, resolve_store_root
from sd_distill.evaluate.config import (TOY_EVAL_PROMPTS, EvaluateParams, ModelSpec, toy_evaluate_params,
                                       toy_prompt_spec)
from sd_distill.store import Manifest
from tasks import evaluate as t


@flow(name="evaluate", persist_result=True, log_prints=True)
def evaluate(
    models: list[ModelSpec] = [ModelSpec(name="teacher", ref="toy:sd")],
    params: Optional[EvaluateParams] = None,
    toy_prompts: int = TOY_EVAL_PROMPTS,
    store_root: str = "",
) -> Manifest:
    """Evaluate ``models``; ``params=None`` means the embedded toy world: ``toy_prompts`` held-out
    COCO-style prompts (and a quarter as many per HPSv2 style) with the toy metric models."""
    quiet_library_environment()
    root = resolve_store_root(store_root)
    if params is None:
        params = toy_evaluate_params(str(t.toy_prompts(toy_prompt_spec(toy_prompts), [], root).path))
    per_model = [t.evaluate_model((params, m), [], root, suffix=m.name if m.sampler == "dpmsolver++" else
                                  f"{m.name}-{m.sampler}") for m in models]
    report = t.build_report(params, per_model, root)
    print(t.publish_report(report))
    return report


if __name__ == "__main__":
    print(evaluate().uri)
