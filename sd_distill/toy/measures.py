"""What the toy world lets us check against ground truth (issue 6), from the stage folders of a run.

- ``curation_measures``: precision / recall of the curate stage's rejections against the planted bad
  pairs, and caption accuracy (attributes parsed back from the caption vs the scene) of the kept
  samples before and after recaptioning.
- ``generation_measures``: attribute accuracy of generated images (the toy classifier reads each
  scene's colours and shapes back) per model x steps, next to the report's FID / CLIP / HPS columns.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

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
    from sd_distill.curate.shards import read_curated

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


def generation_measures(records: list[dict], classifier_ref: str = "toy:classifier", prompt_set: str = "coco",
                        prompts: list[str] | None = None) -> list[dict]:
    """Attribute accuracy of each record's generated images of ``prompt_set`` (prompts in order)."""
    from sd_distill.evaluate.generate import load_images
    from sd_distill.modelref import resolve_model_ref
    from sd_distill.toy.classifier import ToyAttributeClassifier

    if prompts is None:
        raise ValueError("generation_measures needs the prompts the images were generated from, in order")
    classifier = ToyAttributeClassifier.from_pretrained(resolve_model_ref(classifier_ref)).eval()
    rows = []
    for r in records:
        folder = r.get("images", {}).get(prompt_set)
        if folder is None:
            continue
        images = load_images(Path(folder), len(prompts))
        rows.append({"model": r["model"], "steps": r["steps"],
                     "attribute_accuracy": classifier.attribute_accuracy(images, prompts)})
    return rows
