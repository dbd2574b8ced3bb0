"""Prefect tasks of the evaluate stage: the prompt set, one stage per model, the report."""

from __future__ import annotations

import csv

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from sd_distill.evaluate import report as report_lib
from sd_distill.evaluate import run as lib
from sd_distill.evaluate.guidance import guidance_outside_training
from sd_distill.evaluate.records import load_model_records, write_model_records
from sd_distill.modelref import model_fingerprint
from sd_distill.store import StageStore, load_manifest
from sd_distill.toy.measures import curation_measures, generation_differences, report_generation_measures
from sd_distill.toy.sources import make_eval_prompts
from tasks._artifacts import publish_image, publish_markdown
from tasks._stage import stage_task


@stage_task("evaluate/toy-prompts", description="evaluate: toy-world held-out prompts")
def toy_prompts(params, upstream, store_root):
    """Held-out toy prompts + reference images in the COCO and HPSv2-benchmark file layouts."""

    def fn(out, inputs, progress):
        paths = make_eval_prompts(out, n=params["n"], seed=params["seed"], per_style=params["per_style"])
        return {"prompts": params["n"], "per_style": params["per_style"], "files": len(paths)}

    return fn


def _model_key(p):
    """(EvaluateParams, ModelSpec): every field matters, and so do the weights behind each model reference."""
    eval_params, model = p
    refs = {"model": model.ref, "feature_extractor": eval_params.feature_extractor,
            "hps_scorer": eval_params.hps_scorer, "clip_model": eval_params.clip_model}
    return {"params": eval_params, "model": model,
            "fingerprints": {k: model_fingerprint(v) for k, v in refs.items() if isinstance(v, str) and v}}


@stage_task("evaluate/model", key_of=_model_key, description="evaluate: generating and scoring")
def evaluate_model(params, upstream, store_root, suffix):
    """One model at all its step counts: images (resumable per batch), metrics, latency -> records."""
    eval_params, model = params

    def fn(out, inputs, progress):
        note = guidance_outside_training(model, eval_params.guidance_scale)
        if note:
            get_run_logger().warning(note)
        records = lib.model_records(eval_params, [model], out, progress)
        write_model_records(records, out)
        return {"rows": len(records)}

    return fn


# code_version 2: the folder holds each student's completed model card (cards/<model>/README.md)
@stage_task("evaluate/report", key_of=lambda p: p, code_version="2", description="evaluate: report")
def build_report(params, upstream, store_root):
    """The results table (md / csv / json), image grids, metric plots and completed model cards over every model stage."""

    def fn(out, inputs, progress):
        records = [r for folder in inputs for r in load_model_records(load_manifest(folder).path)]
        summary = report_lib.build_report(params, records, out)
        return {"rows": summary["rows"]}

    return fn


def publish_report(manifest) -> str:
    folder = manifest.path
    table = None
    if (folder / "table.csv").exists():
        with open(folder / "table.csv", newline="") as f:
            table = list(csv.DictReader(f))
    markdown = (folder / "table.md").read_text()
    if table:
        create_table_artifact(key="evaluate-results", table=table, description=f"results table ({folder})")
    publish_markdown(markdown, "evaluate-table", "results table (reference layout), 95% intervals over prompts")
    if (folder / "differences.md").exists():
        differences = (folder / "differences.md").read_text()
        publish_markdown(differences, "evaluate-differences", "student minus teacher: paired intervals and verdicts")
        markdown += "\n" + differences
    for grid in sorted((folder / "grids").glob("*.png")):
        publish_image(grid, f"evaluate-grid-{grid.stem.lower().replace('_', '-')}",
                      f"teacher vs student, same prompts and seeds: {grid.stem}")
    publish_image(folder / "metrics_vs_steps.png", "evaluate-metrics-vs-steps", "each metric vs sampling steps")
    return markdown


@task(name="toy-world-measures")
def toy_world_measures(shards, report, store_root: str) -> dict:
    """The toy world's checks against ground truth: the HPS filter vs planted bad pairs, caption accuracy,
    attribute accuracy of every model x steps' generations."""
    store = StageStore(store_root)
    sources = store.find("curate/sources", shards.upstream_key("curate/sources"))
    measures = {"curation": curation_measures(sources.path, shards.path)}
    _, rows, boot = report_generation_measures(report.path, report.params)
    measures["generation_differences"] = generation_differences(rows, **boot)
    measures["generation"] = [{k: v for k, v in r.items() if k != "per_prompt"} for r in rows]
    return measures
