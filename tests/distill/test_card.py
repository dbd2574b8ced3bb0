"""The student's model card: hub front matter, sampling, data, method, evaluation; completed by the report; hub push config."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from sd_distill.distill.card import (EVAL_END, EVAL_START, NOT_EVALUATED, data_summary, model_card, teacher_license,
                                     with_evaluation, write_model_card)
from sd_distill.distill.hub import HubParams, check_push_ready, upload_plan
from sd_distill.evaluate.cards import write_student_cards
from sd_distill.evaluate.config import EvaluateParams


def _config(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", kind="cfg_aware"):
    """A distill_config.json as export_student writes it (the fields the card reads)."""
    return {
        "format": "sd_distill.student/1", "teacher": teacher, "pipeline": "StableDiffusionPipeline",
        "params": {"teacher": teacher, "method": {"kind": kind, "teacher_steps": 16, "student_steps": 8, "guidance_min": 2.0,
                                                  "guidance_max": 14.0},
                   "trainer": {"max_steps": 600, "lr": 2e-05}, "data": {"resolution": 512}},
        "phases": [{"phase": {"name": "cfg-aware-16-8", "index": 0, "kind": "cfg_aware", "teacher_steps": 16, "student_steps": 8}, "steps": 600, "final_loss": 0.01234}],
        "prediction_type": "epsilon", "student_steps": 8, "student_arch": "same", "w_conditioned": False,
        "guidance_convention": "diffusers form: u + s (c - u), s = guidance_scale",
        "sampling": {"scheduler": "DDIMScheduler", "timestep_spacing": "trailing", "num_inference_steps": 8, "eta": 0.0,
                     "unet_evals_per_step": 2, "guidance_scale_example": 8.0},
        "guidance_range": [2.0, 14.0],
    }


MANIFESTS = {
    "curate/shards": {"uri": "/store/curate/shards/abc", "counts": {
        "in": 100, "kept": 60, "rejected": 40,
        "per_source": {"laion": {"in": 70, "kept": 40, "rejected": 30}, "wds": {"in": 30, "kept": 20, "rejected": 10}}}},
    "curate/sources": {"params": {"sources": [{"kind": "laion_parquet", "name": "laion", "path": "/d/laion"},
                                              {"kind": "webdataset", "name": "wds", "path": "/d/shards"}]}},
    "curate/caption-p0of2": {"params": {"caption": {"enabled": True, "captioner": "Salesforce/blip-image-captioning-large",
                                                    "margin": 0.0},
                                        "filter": {"hps_model": "xswu/HPSv2", "hps_version": "v2.1", "threshold": None,
                                                   "top_fraction": 0.7, "per_source": True}}},
}


def test_card_parses_as_a_hub_model_card_with_every_section(tmp_path):
    (tmp_path / "README.md").write_text(model_card(_config(), data_summary(MANIFESTS), license="creativeml-openrail-m",
                                                   repo="me/student"))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.license == "creativeml-openrail-m"
    assert {"stable-diffusion", "text-to-image", "distillation", "cfg-aware-step-distillation", "8-steps"} <= set(card.data.tags)
    text = card.text
    assert 'StableDiffusionPipeline.from_pretrained("me/student")' in text
    assert "num_inference_steps=8, guidance_scale=8.0" in text and 'timestep_spacing="trailing"' in text
    assert "UNet evaluations per step: 2" in text and "u + s (c - u)" in text and "[2.0, 14.0]" in text
    assert "60 image-text pairs kept of 100 (40 rejected)" in text
    assert "| wds | webdataset | 30 | 20 | 10 |" in text
    assert "HPS filter: HPSv2.1 (`xswu/HPSv2`), keep rule best 70% by score, per source." in text
    assert "recaptioned with `Salesforce/blip-image-captioning-large`" in text
    assert "| cfg-aware-16-8 | cfg_aware | 16 -> 8 | 600 | 0.01234 |" in text and "teacher_steps: 16" in text
    assert f"{EVAL_START}\n{NOT_EVALUATED}\n{EVAL_END}" in text


def test_card_says_when_the_teacher_was_fine_tuned_and_the_light_unet_kd_trained_first():
    config = _config()
    assert "fine-tuned" not in model_card(config, data_summary(MANIFESTS))
    config["params"]["method"]["finetune_steps"] = 1000
    config["phases"].insert(0, {"phase": {"name": "finetune-1000", "index": 0, "kind": "finetune", "teacher_steps": 16,
                                          "student_steps": 16}, "steps": 1000, "final_loss": 0.05})
    text = model_card(config, data_summary(MANIFESTS))
    assert "fine-tuned on the curated set for 1000 steps" in text and "| finetune-1000 | finetune | 16 -> 16 | 1000 |" in text
    assert "BK-SDM" not in text
    config["params"]["method"].update(student_arch="bk-tiny", kd_steps=500)
    assert "trained by BK-SDM's task + output + feature KD for 500 steps" in model_card(config, data_summary(MANIFESTS))


def test_local_or_toy_teachers_have_no_base_model_and_license_comes_from_the_teacher_card(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    assert teacher_license(str(teacher)) is None  # no card: unknown
    (teacher / "README.md").write_text("---\nlicense: openrail++\ntags: [x]\n---\n# a teacher\n")
    assert teacher_license(str(teacher)) == "openrail++"
    assert teacher_license("toy:sd") is None and teacher_license("nobody/not-in-the-cache") is None
    student = tmp_path / "student"
    student.mkdir()
    (student / "distill_config.json").write_text(json.dumps(_config(teacher=str(teacher), kind="w_conditioned")))
    card = ModelCard.load(write_model_card(student))
    assert card.data.base_model is None and card.data.license == "openrail++"
    assert "guidance-distillation" in card.data.tags and "Not recorded" in card.text


def test_the_report_writes_the_completed_card_and_leaves_the_student_folder_alone(tmp_path):
    student = tmp_path / "student"
    student.mkdir()
    (student / "distill_config.json").write_text(json.dumps(_config()))
    exported = write_model_card(student, data_summary(MANIFESTS)).read_text()
    records = [
        {"model": "teacher", "kind": "teacher", "steps": 20, "images": {"coco": "t"}, "ref": "toy:sd", "fid": 30.0,
         "fid_lo": 28.0, "fid_hi": 32.5, "clip": 25.5},
        {"model": "student", "kind": "student", "steps": 8, "images": {"coco": "s"}, "ref": str(student), "fid": 35.25,
         "fid_lo": 33.0, "fid_hi": 37.0, "clip": 24.0},
        {"model": "other", "kind": "student", "steps": 8, "images": {"coco": "o"}, "ref": str(tmp_path / "gone")},
    ]
    params = EvaluateParams(coco_captions=None, coco_images=None, resolution=32)
    paths = write_student_cards(params, records, tmp_path / "report")
    assert paths == [tmp_path / "report" / "cards" / "student" / "README.md"]  # "other" is no exported student
    completed = ModelCard.load(paths[0])
    rows = [line.split(" | ")[0] for line in completed.text.splitlines() if line.startswith("| ") and "[" in line]
    assert rows == ["| teacher", "| student"]  # this student's rows and the teacher's, not another student's
    assert "35.25 [33, 37]" in completed.text and "30 [28, 32.5]" in completed.text
    assert "32 px, guidance scale 7.5" in completed.text and NOT_EVALUATED not in completed.text
    assert (student / "README.md").read_text() == exported  # the student stage folder is never rewritten
    # outside the evaluation section the completed card is the exported one
    outside = lambda t: t[: t.index(EVAL_START)] + t[t.index(EVAL_END):]  # noqa: E731
    assert outside(paths[0].read_text()) == outside(exported)
    with pytest.raises(ValueError, match="no evaluation section"):
        with_evaluation("# no sections", "x")


def test_push_to_hub_is_off_by_default_and_its_config_is_checked_before_anything_runs(tmp_path, monkeypatch):
    assert HubParams().enabled is False
    check_push_ready(HubParams())  # disabled: nothing to check
    with pytest.raises(ValueError, match="needs push_to_hub.repo_id"):
        HubParams(enabled=True)
    with pytest.raises(ValueError, match="repo_id"):
        HubParams(enabled=True, repo_id="no-owner")
    params = HubParams(enabled=True, repo_id="me/student", token_env="CAD_TEST_TOKEN")
    monkeypatch.delenv("CAD_TEST_TOKEN", raising=False)
    with pytest.raises(ValueError, match=r"\$CAD_TEST_TOKEN is not set"):
        check_push_ready(params)
    monkeypatch.setenv("CAD_TEST_TOKEN", "hf_x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        check_push_ready(params)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_push_ready(params)


def test_upload_plan_takes_every_file_and_the_completed_card(tmp_path):
    (tmp_path / "s" / "unet").mkdir(parents=True)
    for name in ("unet/config.json", "model_index.json", "README.md", "manifest.json"):
        (tmp_path / "s" / name).write_text("{}")
    (tmp_path / "done.md").write_text("completed")
    plan = dict(upload_plan(tmp_path / "s", tmp_path / "done.md"))
    assert sorted(plan) == ["README.md", "model_index.json", "unet/config.json"]  # the store's manifest stays home
    assert plan["README.md"] == tmp_path / "done.md"
    assert dict(upload_plan(tmp_path / "s"))["README.md"] == tmp_path / "s" / "README.md"
    (tmp_path / "s" / "README.md").unlink()
    with pytest.raises(FileNotFoundError, match="no README.md"):
        upload_plan(tmp_path / "s")
