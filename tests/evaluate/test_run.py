"""The whole evaluate stage on tiny pipelines and fixture prompt sets in the real formats."""

import csv
import json

import pytest
from PIL import Image

from sd_distill.evaluate import EvaluateParams, ModelSpec, evaluate
from sd_distill.evaluate.report import GRID_HEADER, build_report, table_columns

HPS_COLS = [f"hpsv2.1_{s}" for s in ("anime", "concept-art", "paintings", "photo", "mean")]


@pytest.mark.slow
def test_evaluate_builds_the_reference_table_for_teacher_and_w_conditioned_student(
        tmp_path, tiny_teacher, tiny_student, coco_fixture, hpsv2_fixture, tiny_classifier_folder, tiny_clip_folder):
    captions, val = coco_fixture
    params = EvaluateParams(
        steps=[4, 8], resolution=32, batch_size=8, device="cpu", coco_captions=str(captions), max_coco_prompts=10,
        hpsv2_benchmark=str(hpsv2_fixture), max_prompts_per_style=1, feature_extractor=str(tiny_classifier_folder),
        hps_scorer=str(tiny_clip_folder), hps_versions=["v2.1"], clip_model=str(tiny_clip_folder), is_splits=2,
        grid_prompts=3, latency_images=1)
    models = [ModelSpec(name="teacher", ref=str(tiny_teacher)),
              ModelSpec(name="student", ref=str(tiny_student), steps=[4], kind="student"),
              ModelSpec(name="student", ref=str(tiny_student), steps=[4], kind="student", sampler="ddim")]
    seen = []
    summary = evaluate(params, models, tmp_path, progress=lambda d, t, m: seen.append((d, t)))

    assert seen[-1] == (4, 4)
    rows = {(r["model"], r["sampler"], r["steps"]): r for r in summary["records"]}
    # the reference: 8/16/20 vs 8; the student also with DDIM, the sampler it was distilled for
    assert list(rows) == [("teacher", "dpmsolver++", 4), ("teacher", "dpmsolver++", 8), ("student", "dpmsolver++", 4),
                          ("student", "ddim", 4)]
    assert summary["columns"] == ["model", "kind", "steps", "sampler", "fid", "is", "is_std", "clip", *HPS_COLS,
                                  "latency_s", "images_per_s", "unet_evals", "unet_params_m", "unet_gmacs_per_image"]
    for (name, _, steps), r in rows.items():
        evals = 2 * steps if name == "teacher" else steps  # CFG doubles the UNet batch; w-conditioning does not
        assert r["unet_evals"] == evals and r["generated_unet_evals"] == evals
        assert r["fid"] > 0 and 1.0 <= r["is"] <= 18 and 0 <= r["clip"] <= 100  # 18 classifier classes
        assert r["hpsv2.1_mean"] == pytest.approx(sum(r[c] for c in HPS_COLS[:4]) / 4)
        assert all(-100 <= r[c] <= 100 for c in HPS_COLS)
        for key in ("fid", "is", "clip"):  # every metric has its interval, around its value
            assert r[f"{key}_lo"] <= r[key] <= r[f"{key}_hi"], key
        assert not any(f"{c}_lo" in r for c in HPS_COLS)  # one prompt per style: too few to resample
    assert rows[("student", "dpmsolver++", 4)]["unet_params_m"] < rows[("teacher", "dpmsolver++", 4)]["unet_params_m"]
    teacher4, teacher8 = rows[("teacher", "dpmsolver++", 4)], rows[("teacher", "dpmsolver++", 8)]
    assert teacher4["fid"] != teacher8["fid"]  # different images, different statistics
    ddim, dpm = rows[("student", "ddim", 4)], rows[("student", "dpmsolver++", 4)]
    assert ddim["images"]["coco"].endswith("student/ddim-steps-4/coco") and ddim["fid"] != dpm["fid"]
    assert summary["prompt_sets"] == {"coco": 10, "hpsv2-anime": 1, "hpsv2-concept-art": 1, "hpsv2-paintings": 1,
                                      "hpsv2-photo": 1}

    # the table files agree with the records; the CSV carries the intervals
    files = summary["files"]
    with open(files["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [(t["model"], t["sampler"], int(t["steps"])) for t in table] == list(rows)
    assert float(table[2]["fid"]) == pytest.approx(dpm["fid"])
    assert float(table[2]["fid_lo"]) == pytest.approx(dpm["fid_lo"]) and float(table[2]["clip_hi"]) == dpm["clip_hi"]
    assert list(table[0])[4:10] == ["fid", "fid_lo", "fid_hi", "is", "is_lo", "is_hi"]
    md = open(files["markdown"]).read().splitlines()
    assert md[0].startswith("| model | kind | steps | sampler | FID ↓ | IS ↑") and len(md) == 2 + 4
    assert md[5].startswith(f"| student | student | 4 | ddim | {ddim['fid']:.4g} [{ddim['fid_lo']:.4g}, ")
    assert json.loads(open(files["records"]).read())[0]["model"] == "teacher"
    assert (tmp_path / "summary.json").is_file()

    # paired differences: each student row minus each teacher row, every metric, verdict from the interval
    with open(files["differences_csv"]) as f:
        diffs = list(csv.DictReader(f))
    assert len(diffs) == 2 * 2 * 3  # (student rows) x (teacher rows) x (FID, IS, CLIP)
    d = next(r for r in diffs if r["student_sampler"] == "ddim" and r["teacher_steps"] == "8" and r["metric"] == "fid")
    assert float(d["diff"]) == pytest.approx(ddim["fid"] - teacher8["fid"]) and d["better_if"] == "lower"
    assert float(d["lo"]) <= float(d["hi"]) and d["verdict"] in ("better", "worse", "within noise")
    assert "| student | ddim | 4 | teacher | dpmsolver++ | 8 |" in summary["differences_markdown"]

    # grids: one row per model x sampler x steps (teacher at each step count, then the student), one column per prompt
    grid = Image.open(files["grids"][0])
    cell = 4 * 32
    assert grid.size == (150 + 3 * (cell + 2), GRID_HEADER + 4 * (cell + 2))  # prompts written above the columns
    assert Image.open(files["plot"]).size[0] > 0
    assert len(list((tmp_path / "images" / "student" / "steps-4" / "coco").glob("*.png"))) == 10

    # rerunning resumes from the files: nothing regenerated, the same FID and interval (reference statistics cached)
    student_png = tmp_path / "images" / "student" / "steps-4" / "coco" / "00000.png"
    stamp = student_png.stat().st_mtime_ns
    again = evaluate(params, models[1:2], tmp_path, progress=None)
    assert again["records"][0]["fid"] == pytest.approx(dpm["fid"], rel=1e-9)
    assert again["records"][0]["fid_lo"] == pytest.approx(dpm["fid_lo"], rel=1e-9)
    assert student_png.stat().st_mtime_ns == stamp


def test_report_table_keeps_only_computed_columns_in_reference_order(tmp_path):
    params = EvaluateParams(hps_versions=["v2.0", "v2.1"], hpsv2_styles=["anime", "photo"], grid_prompts=2)
    records = [
        {"model": "t", "kind": "teacher", "steps": 8, "fid": 26.5, "hpsv2.0_anime": 27.0, "hpsv2.0_mean": 27.0,
         "unet_evals": 16, "latency_s": 0.5},
        {"model": "s", "kind": "student", "steps": 8, "fid": 22.2, "unet_evals": 8, "latency_s": 0.25,
         "guidance_note": "s is evaluated at guidance_scale 7.5, outside the range it was distilled on [2, 6]"},
    ]
    cols = [k for k, _ in table_columns(params, records)]
    assert cols == ["model", "kind", "steps", "fid", "hpsv2.0_anime", "hpsv2.0_mean", "latency_s", "unet_evals"]
    summary = build_report(params, records, tmp_path)
    assert "| t | teacher | 8 | 26.5 | 27 | 27 | 0.5 | 16 |" in summary["markdown"]
    assert "| s | student | 8 | 22.2 | – | – | 0.25 | 8 |" in summary["markdown"]
    assert summary["markdown"].count("Note: s is evaluated at guidance_scale 7.5, outside the range") == 1
    assert summary["files"]["grids"] == []  # no image folders in these records
    assert (tmp_path / "metrics_vs_steps.png").is_file()


def test_evaluate_rejects_duplicate_model_names(tmp_path, coco_fixture):
    params = EvaluateParams(coco_captions=str(coco_fixture[0]))
    with pytest.raises(ValueError, match="unique"):
        evaluate(params, [ModelSpec(name="a", ref="x"), ModelSpec(name="a", ref="y")], tmp_path)
    with pytest.raises(ValueError, match="pattern"):
        ModelSpec(name="a/b", ref="x")
