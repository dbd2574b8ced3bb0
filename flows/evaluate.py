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

from flows._common import resolve_store_root
from sd_distill.evaluate.config import EvaluateParams, ModelSpec, toy_evaluate_params
from sd_distill.store import Manifest
from tasks import evaluate as t

# The toy world's held-out prompts come from their own random stream (seed 1000; training data uses 0).
TOY_PROMPT_SEED = 1000
# The toy evaluation size: 300 COCO-style prompts and 75 per HPSv2 style. Between the toy teacher's 8- and
# 20-step runs the paired 95% intervals over 300 prompts are about +-1.4 CLIP, +-8 FID and +-0.36 IS wide, so
# differences of that size or more are decided (the 4-step student's CLIP drop of about 4 is; a 0.3 is not);
# halving the widths would take 4x the prompts, past the demo's 10 minutes on 2 cores (this: about 2.5 min).
TOY_EVAL_PROMPTS = 300


def toy_params(prompts: Manifest, **overrides) -> EvaluateParams:
    """EvaluateParams for the toy world, pointing at a toy prompt stage."""
    root = prompts.path
    return toy_evaluate_params(
        str(root), coco_captions=str(root / "coco" / "annotations" / "captions_val2017.json"),
        coco_images=str(root / "coco" / "val2017"), hpsv2_benchmark=str(root / "hps_benchmark"), **overrides,
    )


@flow(name="evaluate", persist_result=True, log_prints=True)
def evaluate(
    models: list[ModelSpec] = [ModelSpec(name="teacher", ref="toy:sd")],
    params: Optional[EvaluateParams] = None,
    toy_prompts: int = TOY_EVAL_PROMPTS,
    store_root: str = "",
) -> Manifest:
    """Evaluate ``models``; ``params=None`` means the embedded toy world: ``toy_prompts`` held-out
    COCO-style prompts (and a quarter as many per HPSv2 style) with the toy metric models."""
    root = resolve_store_root(store_root)
    if params is None:
        spec = {"n": toy_prompts, "seed": TOY_PROMPT_SEED, "per_style": max(1, toy_prompts // 4)}
        params = toy_params(t.toy_prompts(spec, [], root))
    per_model = [t.evaluate_model((params, m), [], root, suffix=m.name if m.sampler == "dpmsolver++" else
                                  f"{m.name}-{m.sampler}") for m in models]
    report = t.build_report(params, per_model, root)
    print(t.publish_report(report))
    return report


if __name__ == "__main__":
    print(evaluate().uri)
