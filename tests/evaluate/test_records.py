"""records.json: written with relative image folders, read back absolute, checked on load naming what is wrong."""

import json

import pytest

from sd_distill.evaluate.records import load_model_records, read_records, write_model_records


def test_records_round_trip_with_image_folders_relative_to_the_stage_folder(tmp_path):
    row = {"model": "teacher", "kind": "teacher", "steps": 8, "sampler": "ddim", "fid": 1.5, "images_per_s": None,
           "images": {"coco": str(tmp_path / "images" / "teacher" / "steps-8" / "coco")}}
    path = write_model_records([row], tmp_path)
    assert json.loads(path.read_text())[0]["images"] == {"coco": "images/teacher/steps-8/coco"}
    assert load_model_records(tmp_path) == [row]


def test_a_bad_record_fails_naming_the_file_the_record_and_the_field(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"model": "s", "kind": "student", "steps": 0, "images": {}}]))
    with pytest.raises(ValueError, match=r"records.json: record 0 \(model 's', steps 0\).*steps"):
        read_records(path)
    path.write_text(json.dumps([{"model": "s", "kind": "pupil", "steps": 4, "images": {}, "fid": "low"}]))
    with pytest.raises(ValueError, match="kind.*fid|fid.*kind|kind"):
        read_records(path)
    path.write_text(json.dumps({"model": "s"}))
    with pytest.raises(ValueError, match="JSON list"):
        read_records(path)
