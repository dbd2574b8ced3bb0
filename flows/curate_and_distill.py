"""The whole DAG, ``curate-and-distill``: curate -> distill -> evaluate (teacher vs student).

Each stage is a subflow whose steps are cached stages in the store, so a retried run resumes at the
stage that failed. On a cluster, ``stage_deployments`` sends distill / evaluate to their own
deployments on a GPU work pool (``run_deployment``); by default every stage runs inline. Run locally::

    make demo                                           # server, worker, deployment run, summary
    python -m flows.curate_and_distill                  # inline, no deployment
    prefect deployment run curate-and-distill/default --params "$(cat my-run.json)"
"""

from __future__ import annotations

if __name__ == "__main__":  # the inline entry point: its offline defaults must be set before Prefect is imported
    from flows._common import inline_run_environment

    inline_run_environment()

from contextlib import nullcontext
from typing import Any, Optional

import fsspec
from prefect import flow, get_run_logger
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from pydantic import BaseModel

from flows._common import inline_run_environment, quiet_library_environment, resolve_store_root
from flows.curate import curate as curate_flow
from flows.distill import distill as distill_flow
from flows.evaluate import evaluate as evaluate_flow
from sd_distill.curate.config import CurateParams
from sd_distill.distill.config import DistillParams, check_extra_students
from sd_distill.distill.hub import HubParams, check_push_ready
from sd_distill.evaluate.config import TOY_EVAL_PROMPTS, EvaluateParams, ModelSpec, student_model_specs
from sd_distill.runfile import StageDeployments, load_run_file
from sd_distill.store import Manifest
from sd_distill.summary import run_summary
from sd_distill.toy.demo import DEMO_CURATE, DEMO_DISTILL
from tasks._artifacts import publish_markdown
from tasks.distill import push_student_to_hub
from tasks.evaluate import toy_world_measures
from tasks.preflight import preflight


# GPU stages take a slot of this global concurrency limit (`prefect gcl create gpu --limit 1` per GPU box);
# without the limit defined it is a no-op.
GPU_LIMIT = "gpu"


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def run_stage(flow_fn, deployment: Optional[str], gpu: bool, **kwargs) -> Manifest:
    """Run a stage flow inline, or as its deployment (waiting for it) when one is named."""
    with concurrency(GPU_LIMIT, occupy=1, strict=False) if gpu else nullcontext():
        if not deployment:
            return flow_fn(**kwargs)
        logger = get_run_logger()
        run = run_deployment(deployment, parameters={k: _jsonable(v) for k, v in kwargs.items()}, timeout=None)
        logger.info("stage %s ran as flow run %s: %s", deployment, run.id, run.state.name)
        if not run.state.is_completed():
            raise RuntimeError(f"stage deployment {deployment} ended {run.state.name}: {run.state.message}")
        return run.state.result()


@flow(name="curate-and-distill", persist_result=True, log_prints=True)
def curate_and_distill(
    curate: CurateParams = DEMO_CURATE,
    distill: DistillParams = DEMO_DISTILL,
    evaluate: Optional[EvaluateParams] = None,
    toy_eval_prompts: int = TOY_EVAL_PROMPTS,
    store_root: str = "",
    stage_deployments: StageDeployments = StageDeployments(),
    extra_students: dict[str, DistillParams] = {},
    push_to_hub: HubParams = HubParams(),
) -> str:
    """curate -> distill -> evaluate; ``evaluate=None`` evaluates on ``toy_eval_prompts`` held-out toy prompts.
    The defaults are the demo's (``sd_distill/toy/demo.py``); a run file or a deployment's parameters replace them.

    ``extra_students`` (name -> DistillParams, same teacher) distils more students from the same curated set, each
    its own cached distill stages (the latent cache is shared when the data settings match), all in one report.
    ``push_to_hub`` (off by default) uploads the student with its completed model card at the end."""
    quiet_library_environment()
    check_extra_students(distill, extra_students)
    check_push_ready(push_to_hub)  # a missing token fails now, not after the training
    root = resolve_store_root(store_root)
    # every model and file the inline stages need, checked before any of them runs
    preflight(None if stage_deployments.curate else curate, None if stage_deployments.distill else distill,
              None if stage_deployments.evaluate else evaluate)
    shards = run_stage(curate_flow, stage_deployments.curate, False, params=curate, store_root=root)
    students = {"student": distill, **extra_students}
    distilled = {name: run_stage(distill_flow, stage_deployments.distill, True, params=p, curated=shards.uri,
                                 store_root=root) for name, p in students.items()}
    student = distilled["student"]
    models = [ModelSpec(name="teacher", ref=distill.teacher, kind="teacher")]
    for name, p in students.items():
        models += student_model_specs(name, distilled[name].uri, p.method.student_steps)
    report = run_stage(evaluate_flow, stage_deployments.evaluate, True, models=models, params=evaluate,
                       toy_prompts=toy_eval_prompts, store_root=root)
    toy = None
    if evaluate is None and all(src.kind == "toy" for src in curate.sources):
        toy = toy_world_measures(shards, report, root)
    summary = run_summary(shards, student, report, toy=toy)
    if push_to_hub.enabled:
        summary += f"\nPushed to the hub: {push_student_to_hub(student, report, push_to_hub)}\n"
    with fsspec.open(f"{root}/latest-summary.md", "w") as f:  # local folder or object store alike
        f.write(summary)
    publish_markdown(summary, "run-summary", "curate-and-distill: counts, scores, the results table, where the files are")
    print(summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m flows.curate_and_distill", description="run the DAG inline")
    p.add_argument("--config", help="a run file (YAML / JSON); none = the embedded toy world")
    p.add_argument("--print-params", action="store_true",
                   help="print the validated parameters as JSON (for `prefect deployment run --params`) and exit")
    args = p.parse_args(argv)
    inline_run_environment()  # a no-op after the entry point's own call; here for callers of main()
    params = load_run_file(args.config) if args.config else {}
    if args.print_params:
        print(json.dumps({k: _jsonable(v) for k, v in params.items()}))
        return
    curate_and_distill(**params)


if __name__ == "__main__":
    main()
