"""What the toy world lets us check against ground truth, from the stage folders of a run.

- ``curation_measures``: precision / recall of the curate stage's rejections against the planted bad
  pairs, and caption accuracy (attributes parsed back from the caption vs the scene) of the kept
  samples before and after recaptioning.
- ``generation_measures``: attribute accuracy of generated images (the toy classifier reads each
  scene's colours and shapes back) per model x sampler x steps, next to the report's FID / CLIP / HPS
  columns, and the paired distance of each run to the teacher's most-steps run (same prompts and seeds).
  Each is a mean over prompts with its bootstrap interval (``<key>_lo`` / ``<key>_hi``, resampled on the
  report's prompt indices, ``sd_distill.evaluate.stats``); ``generation_differences`` pairs every student
  row with every teacher row on them.
- ``report_generation_measures``: both of the above for an evaluate report folder, with its own prompts and
  bootstrap settings.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sd_distill.curate.shards import read_curated
from sd_distill.evaluate import stats
from sd_distill.evaluate.generate import load_images
from sd_distill.evaluate.prompts import load_coco_prompts
from sd_distill.evaluate.records import RECORDS_FILE, read_records
from sd_distill.modelref import resolve_model_ref
from sd_distill.toy.classifier import ToyAttributeClassifier
from sd_distill.toy.world import caption_accuracy

_TOY_KEY = re.compile(r"toy\d{6}")


def _toy_key(*texts) -> str | None:
    for text in texts:
        if isinstance(text, str):
            found = _TOY_KEY.findall(text)
            if found:
                return found[-1]
    return None


def curation_measures(sources_dir: str | Path, shards_dir: str | Path) -> dict:
    """Rejections vs planted bad pairs, and caption accuracy before / after recaptioning.

    ``sources_dir``: the curate/sources stage of a toy source (holds ``toy/truth.parquet`` and
    ``samples.parquet``); ``shards_dir``: the curate/shards stage built from it.
    """
    sources_dir, shards_dir = Path(sources_dir), Path(shards_dir)
    truth_file = sources_dir / "toy" / "truth.parquet"
    if not truth_file.exists():
        raise FileNotFoundError(f"{truth_file} missing: curation measures need a toy source")
    truth = pd.read_parquet(truth_file).set_index("key")
    samples = pd.read_parquet(sources_dir / "samples.parquet", columns=["key", "url", "local_path"])
    toy_of = {row.key: _toy_key(row.url, row.local_path) for row in samples.itertuples()}
    kept = read_curated(shards_dir, columns=["key", "caption_original", "caption", "caption_source"])
    kept_toy = {toy_of.get(k) for k in kept["key"]} - {None}

    toy_keys = [k for k in truth.index if k in set(toy_of.values())]
    bad = np.array([bool(truth.at[k, "is_bad"]) for k in toy_keys])
    rejected = np.array([k not in kept_toy for k in toy_keys])
    tp = float((rejected & bad).sum())
    truths = [truth.at[toy_of[k], "true_caption"] for k in kept["key"]]
    return {
        "samples": len(toy_keys),
        "planted_bad": int(bad.sum()),
        "rejected": int(rejected.sum()),
        "reject_precision": tp / max(1, int(rejected.sum())),
        "reject_recall": tp / max(1, int(bad.sum())),
        "bad_fraction_in": float(bad.mean()) if len(bad) else 0.0,
        "bad_fraction_kept": float((bad & ~rejected).sum() / max(1, (~rejected).sum())),
        "caption_accuracy_original": caption_accuracy(list(kept["caption_original"]), truths),
        "caption_accuracy_final": caption_accuracy(list(kept["caption"]), truths),
        "recaptioned": int((kept["caption_source"] != "original").sum()),
    }


MEASURES = ("attribute_accuracy", "rmse_to_ref", "agreement_with_ref")
LOWER_IS_BETTER = ("rmse_to_ref",)


def generation_measures(records: list[dict], classifier_ref: str = "toy:classifier", prompt_set: str = "coco",
                        prompts: list[str] | None = None, bootstrap_samples: int = 1000, bootstrap_seed: int = 0,
                        level: float = 0.95) -> list[dict]:
    """Per model x sampler x steps: attribute accuracy of the generated images of ``prompt_set`` (prompts in order),
    and how close they are to the reference run: the teacher (``kind`` teacher) at its most steps.

    The closeness is paired (same prompt, same seed, so the same starting noise): ``rmse_to_ref`` is the
    pixel RMSE in [0, 1] units between the two images, ``agreement_with_ref`` the fraction of scene
    attributes the classifier reads the same on both. A student that learned its teacher's 2N-step
    trajectory lands nearer the reference than the teacher's own N-step run does. Every measure is a mean
    over prompts with its ``level`` bootstrap interval; the per-prompt values are kept under ``per_prompt``
    for ``generation_differences`` (the summary does not print them).
    """
    if prompts is None:
        raise ValueError("generation_measures needs the prompts the images were generated from, in order")
    classifier = ToyAttributeClassifier.from_pretrained(resolve_model_ref(classifier_ref)).eval()
    runs = [r for r in records if r.get("images", {}).get(prompt_set)]
    pixels = {id(r): _as_tensor(load_images(Path(r["images"][prompt_set]), len(prompts))) for r in runs}
    teachers = [r for r in runs if r.get("kind") == "teacher"] or runs
    ref = max(teachers, key=lambda r: (r["steps"], r.get("sampler", "dpmsolver++") == "dpmsolver++")) if teachers else None
    ref_pred = classifier.predict(pixels[id(ref)]) if ref else None
    enough = len(prompts) >= stats.MIN_PROMPTS
    indices = stats.bootstrap_indices(len(prompts), bootstrap_samples, stats.set_seed(bootstrap_seed, prompt_set))
    rows = []
    for r in runs:
        images = pixels[id(r)]
        values = {"attribute_accuracy": classifier.attribute_scores(images, prompts)}
        row = {"model": r["model"], "kind": r.get("kind"), "sampler": r.get("sampler", "dpmsolver++"),
               "steps": r["steps"]}
        if ref is not None:
            pred = classifier.predict(images)
            row["reference"] = f"{ref['model']}@{ref['steps']}"
            values["rmse_to_ref"] = image_rmse(images, pixels[id(ref)])
            values["agreement_with_ref"] = np.array([np.mean([a[k] == b[k] for k in a]) for a, b in zip(pred, ref_pred)])
        for key, v in values.items():
            row[key] = float(np.mean(v))
            if enough:
                row[f"{key}_lo"], row[f"{key}_hi"] = stats.percentile_interval(stats.mean_replicates(v, indices), level)
        row["per_prompt"] = {k: v.tolist() for k, v in values.items()}
        rows.append(row)
    return rows


def generation_differences(rows: list[dict], bootstrap_samples: int = 1000, bootstrap_seed: int = 0,
                           prompt_set: str = "coco", level: float = 0.95) -> list[dict]:
    """Each student row minus each teacher row of ``generation_measures``, per measure: the paired bootstrap
    interval and its verdict, in ``sd_distill.evaluate.compare.DIFF_FIELDS`` (the student's reference row, the
    teacher at its most steps, is compared on attribute accuracy only: its closeness to itself is perfect by
    construction)."""
    if not rows or len(next(iter(rows[0]["per_prompt"].values()))) < stats.MIN_PROMPTS:
        return []
    n = len(next(iter(rows[0]["per_prompt"].values())))
    indices = stats.bootstrap_indices(n, bootstrap_samples, stats.set_seed(bootstrap_seed, prompt_set))
    out = []
    for s in (r for r in rows if r.get("kind") == "student"):
        for t in (r for r in rows if r.get("kind") == "teacher"):
            is_reference = t.get("reference") == f"{t['model']}@{t['steps']}" and t["rmse_to_ref"] == 0.0
            for key in MEASURES:
                if key not in s["per_prompt"] or key not in t["per_prompt"] or (is_reference and key != MEASURES[0]):
                    continue
                a, b = np.asarray(s["per_prompt"][key]), np.asarray(t["per_prompt"][key])
                d = stats.paired_difference(a.mean(), b.mean(), stats.mean_replicates(a, indices),
                                            stats.mean_replicates(b, indices), level)
                up = key not in LOWER_IS_BETTER
                out.append({"student": s["model"], "student_sampler": s["sampler"], "student_steps": s["steps"],
                            "teacher": t["model"], "teacher_sampler": t["sampler"], "teacher_steps": t["steps"],
                            "metric": key, "better_if": "higher" if up else "lower", "student_value": s[key],
                            "teacher_value": t[key], **d, "verdict": stats.verdict(d["lo"], d["hi"], up)})
    return out


def image_rmse(images, reference) -> np.ndarray:
    """Per image pair: the pixel RMSE (``[N, ...]`` tensors in [0, 1], same order), float64 [N]."""
    return ((images - reference) ** 2).flatten(1).mean(1).sqrt().double().numpy()


def paired_rmse(images, reference) -> float:
    """Mean over image pairs of the per-image pixel RMSE (``[N, ...]`` tensors in [0, 1], same order)."""
    return float(image_rmse(images, reference).mean())


def _as_tensor(images) -> torch.Tensor:
    """[N, 3, H, W] float in [0, 1] from PIL images."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def report_generation_measures(report_dir: str | Path, params: dict) -> tuple[list[dict], list[dict], dict]:
    """An evaluate report's records, the ``generation_measures`` rows of its images, and the bootstrap settings
    it used (``bootstrap_samples``, ``bootstrap_seed``, ``level``: pass them on to ``generation_differences``).

    ``params``: the report manifest's parameters (its prompt files and bootstrap settings)."""
    boot = {"bootstrap_samples": params.get("bootstrap_samples", 1000),
            "bootstrap_seed": params.get("bootstrap_seed", 0), "level": params.get("confidence", 0.95)}
    prompts = load_coco_prompts(params["coco_captions"], params["coco_images"], params["max_coco_prompts"]).prompts
    records = read_records(Path(report_dir) / RECORDS_FILE)
    return records, generation_measures(records, prompts=prompts, **boot), boot
