"""The evaluate stage: generate every model x steps x prompt set, score, time, and write the report.

``evaluate`` is the whole stage; the Prefect layer can call its steps one by one:
``generate_images`` (per model, steps and prompt set; resumable), ``compute_metrics`` (per image
folder) and ``build_report`` (once). Run under ``accelerate launch`` to shard generation over GPUs;
metrics, timing and the report run on the main process.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from accelerate import PartialState

from sd_distill.progress import ProgressFn, report
from sd_distill.scoring.clip_score import clip_cosines

from .config import EvaluateParams, ModelSpec
from .generate import LazyImages, generate_images, generation_summary, load_images, load_pipeline
from .guidance import guidance_outside_training
from . import stats
from .compare import interval_columns, write_replicates
from .metrics.fid import feature_statistics, fid_to_reference, frechet_distance
from .metrics.features import extract_features
from .metrics.inception_score import inception_score
from .metrics.text_image import LEADERBOARD_SCALE, MetricModels, hps_leaderboard_scale
from .prompts import PromptSet, load_prompt_sets
from .report import build_report, hps_key
from .speed import speed_record

__all__ = ["evaluate", "model_records", "generate_images", "compute_metrics", "build_report", "reference_statistics"]


def reference_statistics(params: EvaluateParams, prompt_set: PromptSet, ref_dir: Path,
                         models: MetricModels | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FID (mu, Sigma) of the set's reference images, cached in ``ref_dir`` per extractor, image list and size.

    The reference images (COCO val2017: various sizes) are center-cropped to a square and resized
    (bicubic) to the generated resolution before feature extraction, so both sets are compared at
    the same scale; the extractor then resizes both alike (299 px for the FID Inception).
    """
    if not prompt_set.reference_images:
        raise ValueError(f"prompt set {prompt_set.name!r} has no reference images for FID")
    key = hashlib.sha256(json.dumps([params.feature_extractor, params.inception_weights, params.resolution,
                                     [str(p) for p in prompt_set.reference_images]]).encode()).hexdigest()[:16]
    path = Path(ref_dir) / f"fid_reference_{key}.npz"
    if path.is_file():
        data = np.load(path)
        return data["mu"], data["sigma"]
    models = models or MetricModels(params)
    images = LazyImages(prompt_set.reference_images)  # decoded one batch at a time
    pool, _ = extract_features(models.extractor(), images, size=params.resolution)
    mu, sigma = feature_statistics(pool)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)
    return mu, sigma


def compute_metrics(params: EvaluateParams, images_dir: Path, prompt_set: PromptSet, ref_dir: Path,
                    models: MetricModels | None = None) -> dict:
    """The metrics of one generated image folder, as table-record keys, with their bootstrap intervals.

    COCO sets: ``fid`` (against the reference images' statistics, cached in ``ref_dir``), ``is`` /
    ``is_std`` and ``clip``; HPSv2 sets: ``hps<version>_<style>`` on the leaderboard scale (mean x 100).
    Each metric also gets ``<key>_lo`` / ``<key>_hi``, the ``params.confidence`` percentile interval over
    ``params.bootstrap_samples`` resamples of the prompts (``stats``), whose replicates are written to the
    folder's ``bootstrap.npz`` (``compare``) for the report's paired differences:

    - CLIP score and HPSv2 are means of per-prompt values: each resample averages the resampled prompts'.
    - FID: each resample takes the generated images' features at the resampled indices and computes FID
      against the *fixed* reference statistics (the reference set is not resampled), on the first
      ``params.fid_samples()`` resamples; IS: each resample recomputes IS with its splits on the resampled
      logits (``is_std`` gets no interval). Resampling duplicates images, which moves every FID / IS
      replicate the same way, so their replicates are centred on the point estimate (``stats.bias_corrected``).

    Sets of fewer than ``stats.MIN_PROMPTS`` prompts get no intervals.

    ``models`` shares loaded metric models between calls.
    """
    models = models or MetricModels(params)
    images = load_images(images_dir, len(prompt_set))
    n = len(prompt_set)
    seed = stats.set_seed(params.bootstrap_seed, prompt_set.name)
    # too few prompts to resample: no interval (and no paired difference) for this set
    boot = n >= stats.MIN_PROMPTS
    indices = stats.bootstrap_indices(n, params.bootstrap_samples, seed) if boot else None
    out: dict = {}
    reps: dict[str, np.ndarray] = {}
    per_prompt: dict[str, np.ndarray] = {}
    if prompt_set.kind == "coco":
        if "fid" in params.metrics or "is" in params.metrics:
            pool, logits = extract_features(models.extractor(), images)
            if "fid" in params.metrics:
                mu_r, sigma_r = reference_statistics(params, prompt_set, ref_dir, models)
                mu_g, sigma_g = feature_statistics(pool)
                out["fid"] = frechet_distance(mu_r, sigma_r, mu_g, sigma_g)
                if boot:
                    fid = fid_to_reference(mu_r, sigma_r)
                    raw = stats.replicates(lambda row: fid(pool[row]), indices[: params.fid_samples()])
                    reps["fid"] = stats.bias_corrected(out["fid"], raw)
            if "is" in params.metrics:
                splits = min(params.is_splits, len(images))
                out["is"], out["is_std"] = inception_score(logits, splits=splits)
                if boot:
                    raw = stats.replicates(lambda row: inception_score(logits[row], splits=splits)[0], indices)
                    reps["is"] = stats.bias_corrected(out["is"], raw)
        if "clip" in params.metrics:
            values = 100.0 * clip_cosines(models.clip(), images, prompt_set.prompts).astype(np.float64)
            out["clip"] = float(max(values.mean(), 0.0))  # clip_score's set value: max(mean(100 cos), 0)
            per_prompt["clip"] = values
            if boot:
                reps["clip"] = np.maximum(stats.mean_replicates(values, indices), 0.0)
    elif prompt_set.kind == "hpsv2" and "hpsv2" in params.metrics:
        for version in params.hps_versions:
            raw = models.hps(version).score(images, prompt_set.prompts).astype(np.float64)
            key = hps_key(version, prompt_set.style)
            out[key] = hps_leaderboard_scale(raw)
            per_prompt[key] = LEADERBOARD_SCALE * raw
            if boot:
                reps[key] = stats.mean_replicates(per_prompt[key], indices)
    for key, r in reps.items():
        out[f"{key}_lo"], out[f"{key}_hi"] = stats.percentile_interval(r, params.confidence)
    if reps:
        write_replicates(Path(images_dir), n, params.bootstrap_samples, seed, params.confidence, reps, per_prompt)
    return out


def _hps_means(params: EvaluateParams, row: dict) -> None:
    """The mean over styles per version, as the leaderboard's "Average" column, with its interval (each style
    resampled on its own prompts)."""
    for version in params.hps_versions:
        vals = [row[hps_key(version, s)] for s in params.hpsv2_styles if hps_key(version, s) in row]
        if vals:
            row[hps_key(version, "mean")] = float(np.mean(vals))
    means = {k: v for k, v in interval_columns(row, params.hps_versions, params.confidence).items()
             if k.startswith("hps") and "_mean_" in k}
    row.update(means)


def model_records(params: EvaluateParams, models: list[ModelSpec], out_dir: Path,
                  progress: ProgressFn | None = None) -> list[dict]:
    """Generate, score and time every model at its step counts (images under ``out_dir``); one record per
    model x steps on the main process (an empty list on the others). No report: see ``evaluate``."""
    if not models:
        raise ValueError("evaluate needs at least one ModelSpec")
    names = [(m.name, m.sampler) for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique per sampler (they name image folders and table rows): {names}")
    out_dir = Path(out_dir)
    state = PartialState()
    sets = load_prompt_sets(params)
    metric_models = MetricModels(params) if state.is_main_process else None
    total = sum(len(params.model_steps(m)) for m in models)
    records, done = [], 0
    for model in models:
        pipe = load_pipeline(model.ref, params.device, params.dtype, model.sampler)
        for steps in params.model_steps(model):
            row = {"model": model.name, "kind": model.kind, "steps": steps, "sampler": model.sampler,
                   "timestep_spacing": pipe.scheduler.config.get("timestep_spacing"), "ref": model.ref, "images": {}}
            note = guidance_outside_training(model, params.guidance_scale)
            if note:
                row["guidance_note"] = note
            for prompt_set in sets:
                folder = generate_images(params, model, steps, prompt_set, out_dir / "images", progress, pipe=pipe)
                row["images"][prompt_set.name] = str(folder)
                if state.is_main_process:
                    row.update(compute_metrics(params, folder, prompt_set, out_dir / "reference", metric_models))
            if state.is_main_process:
                gen = generation_summary(Path(row["images"][sets[0].name]))
                row["images_per_s"] = 1.0 / gen["seconds_per_image"] if gen["seconds_per_image"] > 0 else None
                row["generated_unet_evals"] = gen["unet_evals_per_image"]
                row.update(speed_record(pipe, sets[0].prompts[: params.latency_images], steps,
                                        params.guidance_scale, params.resolution, params.seed))
                _hps_means(params, row)
                records.append(row)
            done += 1
            report(progress, done, total, f"evaluated {model.name} at {steps} {model.sampler} steps")
        del pipe
    return records


def evaluate(params: EvaluateParams, models: list[ModelSpec], out_dir: Path, progress: ProgressFn | None = None) -> dict:
    """Evaluate every model at its step counts; write images, table, grids and plot under ``out_dir``.

    Returns the summary: ``rows``, ``columns``, ``records`` (one dict per model x steps), ``files``.
    """
    records = model_records(params, models, out_dir, progress)
    if not PartialState().is_main_process:
        return {"rows": 0, "records": [], "files": {}}
    sets = load_prompt_sets(params)
    summary = build_report(params, records, out_dir)
    summary["prompt_sets"] = {s.name: len(s) for s in sets}
    saved = {k: v for k, v in summary.items() if not k.endswith("markdown")}
    (out_dir / "summary.json").write_text(json.dumps(saved, indent=1))
    return summary
