"""Toy-world ground-truth measures computed from real stage folders (collect step + curated shard schema)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sd_distill.curate.collect import collect_sources
from sd_distill.curate.config import CurateParams, SourceSpec
from sd_distill.curate.shards import CURATED_SCHEMA
from sd_distill.toy.measures import curation_measures, generation_measures


@pytest.fixture(scope="module")
def toy_sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("sources")
    collect_sources(CurateParams(sources=[SourceSpec(kind="toy", toy_n=40, toy_seed=3)]), out)
    return out


def _write_shards(folder, samples, keep_keys, recaption=None):
    import pandas as pd

    rows = samples[samples["key"].isin(keep_keys)]
    table = {name: [None] * len(rows) for name in CURATED_SCHEMA.names}
    table.update(key=list(rows["key"]), source=list(rows["source"]), caption_original=list(rows["caption_original"]),
                 caption=[(recaption or {}).get(k, c) for k, c in zip(rows["key"], rows["caption_original"])],
                 caption_source=["generated" if k in (recaption or {}) else "original" for k in rows["key"]])
    folder.mkdir()
    pq.write_table(pa.Table.from_pydict(table, schema=CURATED_SCHEMA), folder / "part-00000.parquet")
    return folder


def test_rejecting_exactly_the_planted_bad_pairs_scores_perfect_precision_and_recall(toy_sources, tmp_path):
    import pandas as pd

    from sd_distill.toy.measures import _toy_key

    truth = pd.read_parquet(toy_sources / "toy" / "truth.parquet").set_index("key")
    samples = pd.read_parquet(toy_sources / "samples.parquet")
    good = [k for k, u, p in zip(samples["key"], samples["url"], samples["local_path"]) if not truth.at[_toy_key(u, p), "is_bad"]]
    m = curation_measures(toy_sources, _write_shards(tmp_path / "shards", samples, good))
    assert m["samples"] == 40 and m["planted_bad"] == 10
    assert m["reject_precision"] == 1.0 and m["reject_recall"] == 1.0 and m["bad_fraction_kept"] == 0.0


def test_keeping_everything_has_zero_recall_and_recaptioning_with_truth_raises_caption_accuracy(toy_sources, tmp_path):
    import pandas as pd

    from sd_distill.toy.measures import _toy_key

    truth = pd.read_parquet(toy_sources / "toy" / "truth.parquet").set_index("key")
    samples = pd.read_parquet(toy_sources / "samples.parquet")
    fixed = {k: truth.at[_toy_key(u, p), "true_caption"] for k, u, p in zip(samples["key"], samples["url"], samples["local_path"])}
    m = curation_measures(toy_sources, _write_shards(tmp_path / "shards", samples, list(samples["key"]), fixed))
    assert m["rejected"] == 0 and m["reject_recall"] == 0.0 and m["bad_fraction_kept"] == 0.25
    assert m["caption_accuracy_final"] == 1.0 > m["caption_accuracy_original"]


def test_generation_measures_read_real_scenes_back(tmp_path):
    from sd_distill.toy.world import caption_for, make_samples, render_scene

    samples = [s for s in make_samples(12, seed=5, bad_fraction=0.0)]
    folder = tmp_path / "images"
    folder.mkdir()
    prompts = []
    for i, s in enumerate(samples):
        render_scene(s.truth, 32).save(folder / f"{i:05d}.png")
        prompts.append(caption_for(s.truth))
    rows = generation_measures([{"model": "real", "steps": 0, "images": {"coco": str(folder)}}], prompts=prompts)
    assert rows[0]["attribute_accuracy"] > 0.95
    wrong = prompts[1:] + prompts[:1]
    assert generation_measures([{"model": "real", "steps": 0, "images": {"coco": str(folder)}}], prompts=wrong)[0]["attribute_accuracy"] < 0.8



def _rendered_runs(tmp_path, n: int, seed: int, orders: dict) -> tuple[list[str], dict]:
    """Prompts of ``n`` clean toy scenes and one folder of their renders per named order (a fake model run)."""
    from sd_distill.toy.world import caption_for, make_samples, render_scene

    samples = make_samples(n, seed=seed, bad_fraction=0.0)
    folders = {}
    for name, order in orders.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for i, j in enumerate(order):
            render_scene(samples[j].truth, 32, np.random.default_rng(j)).save(folders[name] / f"{i:05d}.png")
    return [caption_for(s.truth) for s in samples], folders


def test_paired_measures_rank_runs_by_closeness_to_the_teachers_most_steps_run(tmp_path):
    """The reference is the teacher at its most steps; a copy of it scores RMSE 0 / agreement 1, a shuffled set less."""
    prompts, folders = _rendered_runs(tmp_path, 10, 6, {"ref": range(10), "copy": range(10),
                                                        "shuffled": [(i + 3) % 10 for i in range(10)]})
    records = [{"model": "teacher", "kind": "teacher", "steps": 20, "images": {"coco": str(folders["ref"])}},
               {"model": "teacher", "kind": "teacher", "steps": 8, "images": {"coco": str(folders["shuffled"])}},
               {"model": "student", "kind": "student", "steps": 8, "images": {"coco": str(folders["copy"])}}]
    rows = {(r["model"], r["steps"]): r for r in generation_measures(records, prompts=prompts)}
    assert {r["reference"] for r in rows.values()} == {"teacher@20"}
    assert rows["teacher", 20]["rmse_to_ref"] == 0 and rows["teacher", 20]["agreement_with_ref"] == 1
    assert rows["student", 8]["rmse_to_ref"] == 0 and rows["student", 8]["agreement_with_ref"] == 1
    assert rows["teacher", 8]["rmse_to_ref"] > 0.05 and rows["teacher", 8]["agreement_with_ref"] < 0.8


def test_toy_measures_carry_intervals_and_students_are_paired_with_each_teacher_row(tmp_path):
    """A student that copies the reference beats a shuffled teacher run on closeness by its interval, not by luck."""
    from sd_distill.summary import toy_lines
    from sd_distill.toy.measures import generation_differences

    prompts, folders = _rendered_runs(tmp_path, 12, 7, {"ref": range(12), "shuffled": [(i + 5) % 12 for i in range(12)]})
    records = [{"model": "teacher", "kind": "teacher", "steps": 20, "images": {"coco": str(folders["ref"])}},
               {"model": "teacher", "kind": "teacher", "steps": 8, "images": {"coco": str(folders["shuffled"])}},
               {"model": "student", "kind": "student", "steps": 8, "sampler": "ddim",
                "images": {"coco": str(folders["ref"])}}]
    rows = generation_measures(records, prompts=prompts, bootstrap_samples=300)
    for r in rows:
        for key in ("attribute_accuracy", "rmse_to_ref", "agreement_with_ref"):
            assert r[f"{key}_lo"] <= r[key] <= r[f"{key}_hi"]
    diffs = {(r["teacher_steps"], r["metric"]): r for r in generation_differences(rows, bootstrap_samples=300)}
    assert diffs[8, "rmse_to_ref"]["verdict"] == "better" and diffs[8, "rmse_to_ref"]["better_if"] == "lower"
    assert diffs[8, "agreement_with_ref"]["verdict"] == "better"
    same = diffs[20, "attribute_accuracy"]  # the same images as the reference row: exactly 0
    assert (same["diff"], same["lo"], same["hi"], same["verdict"]) == (0.0, 0.0, 0.0, "within noise")
    assert (20, "rmse_to_ref") not in diffs  # the reference's closeness to itself is no comparison
    text = "\n".join(toy_lines({"curation": {"rejected": 1, "samples": 2, "planted_bad": 1, "reject_precision": 1.0,
                                             "reject_recall": 1.0, "bad_fraction_in": 0.5, "bad_fraction_kept": 0.0,
                                             "caption_accuracy_original": 0.5, "caption_accuracy_final": 1.0,
                                             "recaptioned": 1},
                                "generation": rows, "generation_differences": list(diffs.values())}))
    assert "| student | ddim | 8 | " in text and "RMSE to teacher@20 ↓" in text.replace("pixel RMSE", "RMSE")
    assert "| student | ddim | 8 | teacher | dpmsolver++ | 8 |" in text
