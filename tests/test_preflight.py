"""Fail fast: a run whose teacher, scorer, captioner, evaluation models or source files are missing stops before
any stage runs, naming every problem at once; the embedded toy run passes."""

from __future__ import annotations

import shutil

import pytest

from sd_distill.curate.config import CurateParams
from sd_distill.distill.config import DistillParams
from sd_distill.evaluate.config import EvaluateParams
from sd_distill.modelref import TOY_ASSETS
from sd_distill.preflight import PreflightError, check_run, run_problems


def test_the_embedded_toy_run_passes():
    assert run_problems(CurateParams(), DistillParams(), None) == []


def test_every_missing_reference_is_named_in_one_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SD_DISTILL_ALLOW_DOWNLOAD", raising=False)
    broken_teacher = tmp_path / "teacher"
    shutil.copytree(TOY_ASSETS / "sd", broken_teacher)
    (broken_teacher / "unet" / "config.json").unlink()
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://example.com/a.png,a cat\n")
    curate = CurateParams.model_validate({
        "sources": [{"kind": "url_list", "path": str(tmp_path / "urls.csv")},
                    {"kind": "laion_parquet", "path": str(tmp_path / "missing.parquet")},
                    {"kind": "coco_json", "path": str(tmp_path / "urls.csv"), "images_root": str(tmp_path / "nope")}],
        "filter": {"hps_model": str(tmp_path / "HPS_v2.1_compressed.pt")},
        "caption": {"captioner": "Salesforce/not-in-the-cache"},
    })
    evaluate = EvaluateParams(coco_captions=str(tmp_path / "captions_val2017.json"), hps_scorer="toy:hps",
                              clip_model="toy:hps", feature_extractor="toy:classifier", hps_versions=["v2.1"])
    problems = run_problems(curate, DistillParams(teacher=str(broken_teacher)), evaluate)
    joined = "\n".join(problems)
    assert len(problems) == 6, joined
    assert "curate.sources[1].path" in joined and "missing.parquet" in joined
    assert "curate.sources[2].images_root" in joined
    assert "curate.filter.hps_model" in joined
    assert "curate.caption.captioner = 'Salesforce/not-in-the-cache'" in joined
    assert "distill.teacher" in joined and "unet config" in joined
    assert "evaluate.coco_captions" in joined
    assert "curate.sources[0]" not in joined  # the file that exists passes
    with pytest.raises(PreflightError, match="the run cannot start") as err:
        check_run(curate, DistillParams(teacher=str(broken_teacher)), evaluate)
    assert err.value.problems == problems


def test_hub_ids_are_taken_as_they_stand_when_downloads_are_allowed(monkeypatch):
    monkeypatch.setenv("SD_DISTILL_ALLOW_DOWNLOAD", "1")
    assert run_problems(None, DistillParams(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5"), None) == []
    monkeypatch.setenv("SD_DISTILL_ALLOW_DOWNLOAD", "0")
    (problem,) = run_problems(None, DistillParams(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5"), None)
    assert problem.startswith("distill.teacher")


@pytest.mark.usefixtures("prefect_harness")
def test_parent_flow_stops_before_curation_when_the_teacher_is_missing(tmp_path):
    from flows.curate_and_distill import curate_and_distill

    store = tmp_path / "store"
    state = curate_and_distill(distill=DistillParams(teacher=str(tmp_path / "no-such-teacher")),
                               store_root=str(store), return_state=True)
    assert state.is_failed()
    with pytest.raises(PreflightError, match="distill.teacher"):
        state.result()
    assert not (store / "curate").exists()  # nothing was curated first
