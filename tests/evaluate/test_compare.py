"""Paired differences of the report (compare.py) and the verdicts the run summary prints, on synthetic replicates."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest

from sd_distill.evaluate import compare, stats
from sd_distill.evaluate.config import EvaluateParams
from sd_distill.evaluate.report import build_report


def _record(tmp_path, name, kind, steps, clip_values, fid_shift=0.0, sampler="dpmsolver++", seed=0):
    """A record whose coco folder holds replicates computed as compute_metrics does, from per-prompt CLIP values."""
    folder = tmp_path / name / sampler / str(steps) / "coco"
    folder.mkdir(parents=True)
    n = len(clip_values)
    idx = stats.bootstrap_indices(n, 400, seed)
    reps = {"clip": stats.mean_replicates(clip_values, idx), "fid": 50.0 + fid_shift + 0.0 * idx[:, 0]}
    compare.write_replicates(folder, n, 400, seed, 0.95, reps, {"clip": clip_values})
    record = {"model": name, "kind": kind, "steps": steps, "sampler": sampler, "images": {"coco": str(folder)},
              "clip": float(np.mean(clip_values)), "fid": 50.0 + fid_shift}
    record.update(compare.interval_columns(record))
    return record


def test_student_minus_teacher_is_paired_and_judged_by_the_interval(tmp_path):
    base = np.random.default_rng(0).normal(70, 10, 100)  # wide per-prompt spread, shared by both models
    teacher = _record(tmp_path, "teacher", "teacher", 8, base)
    better = _record(tmp_path, "student", "student", 8, base + 0.5, fid_shift=-2.0, sampler="ddim")
    same = _record(tmp_path, "student", "student", 4, base + np.random.default_rng(1).normal(0, 1, 100))
    rows = compare.paired_differences([teacher, better, same])
    by = {(r["student_steps"], r["metric"]): r for r in rows}
    assert len(rows) == 4 and {r["teacher_steps"] for r in rows} == {8}
    clip = by[8, "clip"]  # a constant +0.5 on every prompt: exactly +0.5, though each model's own interval is ~4 wide
    assert (clip["diff"], clip["lo"], clip["hi"]) == pytest.approx((0.5, 0.5, 0.5)) and clip["verdict"] == "better"
    assert better["clip_hi"] - better["clip_lo"] > 2.0
    assert by[8, "fid"]["verdict"] == "better" and by[8, "fid"]["better_if"] == "lower"  # FID down 2
    assert by[4, "clip"]["lo"] < 0 < by[4, "clip"]["hi"] and by[4, "clip"]["verdict"] == "within noise"
    assert by[4, "fid"]["verdict"] == "within noise"  # identical FID replicates: difference exactly 0
    md = compare.differences_markdown(rows, ["fid", "clip"])
    assert "| student | ddim | 8 | teacher | dpmsolver++ | 8 | -2 [-2, -2] better | +0.5 [+0.5, +0.5] better |" in md
    assert compare.verdict_lines(rows) == [
        "student (ddim, 8 steps) vs teacher (dpmsolver++, 8 steps): better on FID, CLIP",
        "student (dpmsolver++, 4 steps) vs teacher (dpmsolver++, 8 steps): within noise on FID, CLIP"]


def test_replicates_from_another_resampling_are_refused_and_old_records_get_no_differences(tmp_path):
    base = np.linspace(60, 80, 50)
    teacher = _record(tmp_path, "teacher", "teacher", 8, base)
    other = _record(tmp_path, "student", "student", 8, base, seed=1)
    with pytest.raises(ValueError, match="resampled differently"):
        compare.paired_differences([teacher, other])
    old = {k: v for k, v in teacher.items() if k != "images"}  # records written before replicates existed
    assert compare.paired_differences([old, {**old, "model": "s", "kind": "student"}]) == []


def test_report_writes_interval_columns_and_differences_and_the_summary_states_verdicts(tmp_path):
    from sd_distill.summary import run_summary

    base = np.random.default_rng(2).normal(70, 10, 100)
    records = [_record(tmp_path, "teacher", "teacher", 8, base),
               _record(tmp_path, "student", "student", 8, base - 1.0, fid_shift=3.0, sampler="ddim")]
    out = tmp_path / "report"
    params = EvaluateParams(metrics=["fid", "clip"], hps_versions=[], grid_prompts=1)
    summary = build_report(params, records, out)
    with open(out / "table.csv") as f:
        header = next(csv.reader(f))
    assert header[:10] == ["model", "kind", "steps", "sampler", "fid", "fid_lo", "fid_hi", "clip", "clip_lo", "clip_hi"]
    assert summary["files"]["differences_csv"].endswith("differences.csv")
    assert [r["verdict"] for r in compare.read_differences(out)] == ["worse", "worse"]  # FID up 3, CLIP down 1

    manifest = SimpleNamespace(uri=str(tmp_path), counts={})
    text = run_summary(manifest, manifest, SimpleNamespace(uri=str(out), counts={}))
    assert "| teacher | teacher | 8 | dpmsolver++ |" in text and "| student | ddim | 8 | teacher |" in text
    assert "- student (ddim, 8 steps) vs teacher (dpmsolver++, 8 steps): worse on FID, CLIP" in text


def test_summary_names_the_method_and_a_fine_tune_phase_from_the_students_config(tmp_path):
    from sd_distill.summary import run_summary

    student = tmp_path / "student"
    student.mkdir()
    config = {"prediction_type": "epsilon", "params": {"method": {"kind": "cfg_aware", "teacher_steps": 16,
                                                                  "student_steps": 8, "finetune_steps": 700}}}
    (student / "distill_config.json").write_text(json.dumps(config))
    empty = SimpleNamespace(uri=str(tmp_path), counts={})
    text = run_summary(empty, SimpleNamespace(uri=str(student), counts={}), empty)
    assert "Method: `cfg_aware`, teacher 16 -> student 8 steps; prediction type `epsilon`" in text
    assert "first fine-tuned on the curated set (700 steps" in text
    assert "BK-SDM" not in text
    config["params"]["method"].update(student_arch="bk-tiny", kd_steps=500)
    (student / "distill_config.json").write_text(json.dumps(config))
    text = run_summary(empty, SimpleNamespace(uri=str(student), counts={}), empty)
    assert "The bk-tiny block-removed UNet was first trained by BK-SDM's KD (500 steps)" in text
    config["params"]["method"]["finetune_steps"] = 0
    (student / "distill_config.json").write_text(json.dumps(config))
    assert "fine-tuned" not in run_summary(empty, SimpleNamespace(uri=str(student), counts={}), empty)
