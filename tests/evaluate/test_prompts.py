"""Prompt loaders: COCO captions_val2017.json and the HPSv2 benchmark files, including malformed files."""

import json

import pytest

from sd_distill.evaluate.config import EvaluateParams
from sd_distill.evaluate.prompts import load_coco_prompts, load_hpsv2_prompts, load_prompt_sets
from tests._fixtures_evaluate import write_coco_fixture


def test_coco_takes_first_caption_per_image_sorted_by_image_id(coco_fixture):
    captions, val = coco_fixture
    ps = load_coco_prompts(captions, max_prompts=5)
    assert ps.ids == [1000, 1007, 1014, 1021, 1028]
    # image 1000 is the last one listed (k = 11); its lowest annotation id holds the stripped "first" caption
    assert ps.prompts[0] == "first a green circle"  # k = 11: COLORS[11 % 3], SHAPES[(11 // 3) % 3]
    assert all(p.startswith("first ") for p in ps.prompts)
    assert ps.reference_images[0] == val / "000000001000.png"  # found via ../val2017 (COCO layout)
    assert ps.kind == "coco" and len(ps) == 5


def test_coco_missing_reference_images_fail_with_the_folder(tmp_path):
    captions, val = write_coco_fixture(tmp_path, n_images=3)
    (val / "000000001007.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 COCO reference images missing"):
        load_coco_prompts(captions)
    assert len(load_coco_prompts(captions, check_images=False)) == 3


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "top-level lists 'images' and 'annotations'"),
    (json.dumps({"images": [{"id": 1}], "annotations": []}), r"images\[0\] needs 'id' and 'file_name'"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1}]}),
     r"annotations\[0\] needs 'image_id' and a string 'caption'"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 2, "caption": "x"}]}),
     "image_id 2, which is not in 'images'"),
    (json.dumps({"images": [], "annotations": []}), "no captions found"),
])
def test_coco_malformed_files_fail_naming_the_problem(tmp_path, content, message):
    path = tmp_path / "captions_val2017.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_coco_prompts(path, check_images=False)


def test_hpsv2_benchmark_one_set_per_style_with_limit(hpsv2_fixture):
    sets = load_hpsv2_prompts(hpsv2_fixture, ["anime", "photo"], max_per_style=2)
    assert [s.name for s in sets] == ["hpsv2-anime", "hpsv2-photo"]
    assert [s.style for s in sets] == ["anime", "photo"] and all(len(s) == 2 for s in sets)
    assert sets[0].prompts[0] == json.loads((hpsv2_fixture / "anime.json").read_text())[0]


def test_hpsv2_missing_style_lists_the_styles_present(hpsv2_fixture):
    with pytest.raises(FileNotFoundError, match=r"styles present: \['anime', 'concept-art', 'paintings', 'photo'\]"):
        load_hpsv2_prompts(hpsv2_fixture, ["Animation"])


@pytest.mark.parametrize("content, message", [
    (json.dumps({"prompts": ["a"]}), "JSON list of prompt strings"),
    (json.dumps(["a", 3]), "JSON list of prompt strings"),
    (json.dumps([]), "empty"),
    ("[", "not valid JSON"),
])
def test_hpsv2_malformed_style_file(tmp_path, content, message):
    (tmp_path / "anime.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_hpsv2_prompts(tmp_path, ["anime"])


def test_prompt_sets_follow_metrics_and_need_at_least_one_source(coco_fixture, hpsv2_fixture):
    captions, _ = coco_fixture
    p = EvaluateParams(coco_captions=str(captions), hpsv2_benchmark=str(hpsv2_fixture), max_coco_prompts=4)
    assert [s.name for s in load_prompt_sets(p)] == ["coco", "hpsv2-anime", "hpsv2-concept-art", "hpsv2-paintings",
                                                     "hpsv2-photo"]
    only_hps = p.model_copy(update={"metrics": ["hpsv2"]})
    assert [s.kind for s in load_prompt_sets(only_hps)] == ["hpsv2"] * 4
    with pytest.raises(ValueError, match="no prompt set to evaluate"):
        load_prompt_sets(EvaluateParams())


def test_params_reject_unknown_metric_and_bad_steps():
    with pytest.raises(ValueError, match="fid"):
        EvaluateParams(metrics=["fidd"])
    with pytest.raises(ValueError, match="positive"):
        EvaluateParams(steps=[0])
    with pytest.raises(ValueError, match="Extra inputs"):
        EvaluateParams(guidance=7.5)


def test_toy_params_read_the_toy_worlds_eval_prompt_files(tmp_path):
    from sd_distill.evaluate.config import toy_evaluate_params
    from sd_distill.toy.sources import make_eval_prompts

    make_eval_prompts(tmp_path, n=6, per_style=2)
    params = toy_evaluate_params(str(tmp_path), max_coco_prompts=4)
    assert params.resolution == 32 and params.feature_extractor == "toy:classifier"
    sets = load_prompt_sets(params)
    assert [s.name for s in sets] == ["coco", "hpsv2-anime", "hpsv2-concept-art", "hpsv2-paintings", "hpsv2-photo"]
    assert len(sets[0]) == 4 and all(p.is_file() for p in sets[0].reference_images)
