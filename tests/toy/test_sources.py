"""make_toy_sources / make_eval_prompts write each real source format with the same samples."""

import json
import zipfile

import pandas as pd
import pytest
from PIL import Image

from sd_distill.toy.sources import HPS_STYLES, make_eval_prompts, make_toy_sources
from sd_distill.toy.world import caption_accuracy, parse_caption


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return out, make_toy_sources(out, n=30, seed=0, bad_fraction=0.2, base_url="http://host:1")


def test_every_sample_appears_in_exactly_one_source(sources):
    out, p = sources
    truth = pd.read_parquet(p["truth"])
    assert len(truth) == 30 and truth["key"].is_unique
    assert truth["is_bad"].sum() == 6
    laion = pd.read_parquet(p["laion"])
    coco = json.loads(p["coco"].read_text())
    ddb = pd.read_parquet(p["diffusiondb"])
    train, test = json.loads(p["hpdv2_train"].read_text()), json.loads(p["hpdv2_test"].read_text())
    urls = pd.read_csv(p["urls"])
    keys = (
        [u.rsplit("/", 1)[1][:-4] for u in laion["URL"]]
        + [im["file_name"][:-4] for im in coco["images"]]
        + [n[:-4] for n in ddb["image_name"]]
        + [e["file_path"][0].split("/")[1][:-4] for e in train]
        + [e["image_path"][0].split("/")[1][:-4] for e in test]
        + [u.rsplit("/", 1)[1][:-4] for u in urls["url"]]
    )
    assert sorted(keys) == sorted(truth["key"])
    assert (truth["source"].value_counts() == 6).all()


def test_laion_parquet_has_the_published_columns_and_urls(sources):
    out, p = sources
    laion = pd.read_parquet(p["laion"])
    assert list(laion.columns) == ["URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "aesthetic"]
    assert laion["URL"].str.match(r"http://host:1/images/toy\d{6}\.png").all()
    assert (laion["WIDTH"] == 32).all()


def test_coco_json_links_captions_to_local_images(sources):
    out, p = sources
    coco = json.loads(p["coco"].read_text())
    ids = {im["id"]: im for im in coco["images"]}
    assert {a["image_id"] for a in coco["annotations"]} == set(ids)
    assert len(coco["annotations"]) > len(ids)  # clean images carry a second caption
    for im in coco["images"]:
        assert (p["coco_images"] / im["file_name"]).is_file()
        assert im["coco_url"].endswith(im["file_name"])


def test_diffusiondb_zip_holds_images_and_part_json_matching_metadata(sources):
    out, p = sources
    ddb = pd.read_parquet(p["diffusiondb"])
    assert str(ddb["seed"].dtype) == "uint32" and str(ddb["cfg"].dtype) == "float32"
    assert str(ddb["timestamp"].dtype).startswith("datetime64") and (ddb["part_id"] == 1).all()
    with zipfile.ZipFile(p["diffusiondb_zip"]) as zf:
        part = json.loads(zf.read("part-000001.json"))
        assert set(part) == set(ddb["image_name"])
        for row in ddb.itertuples():
            assert part[row.image_name]["p"] == row.prompt
            Image.open(zf.open(row.image_name)).verify()


def test_hpdv2_files_follow_train_and_test_layouts(sources):
    out, p = sources
    root = p["hpdv2_train"].parent
    for e in json.loads(p["hpdv2_train"].read_text()):
        assert e["human_preference"] == [1, 0] and len(e["file_path"]) == 2
        assert all((root / f).is_file() for f in e["file_path"])
    for e in json.loads(p["hpdv2_test"].read_text()):
        assert e["rank"] == [1, 2] and all((root / f).is_file() for f in e["image_path"])


def test_published_captions_are_less_accurate_than_true_ones(sources):
    out, p = sources
    truth = pd.read_parquet(p["truth"])
    assert caption_accuracy(truth["true_caption"], truth) == 1.0
    assert caption_accuracy(truth["caption"], truth) < 1.0


def test_make_toy_sources_is_deterministic_and_checks_image_size(tmp_path):
    a = make_toy_sources(tmp_path / "a", n=10, seed=3)
    b = make_toy_sources(tmp_path / "b", n=10, seed=3)
    assert pd.read_parquet(a["truth"]).equals(pd.read_parquet(b["truth"]))
    assert (a["images"] / "toy000004.png").read_bytes() == (b["images"] / "toy000004.png").read_bytes()
    with pytest.raises(ValueError, match="image_size"):
        make_toy_sources(tmp_path / "c", n=5, image_size=16)


def test_make_eval_prompts_writes_coco_val_and_hps_benchmark(tmp_path):
    p = make_eval_prompts(tmp_path, n=8, per_style=5)
    coco = json.loads(p["coco_captions"].read_text())
    assert p["coco_captions"].name == "captions_val2017.json" and len(coco["images"]) == 8
    assert all((p["coco_images"] / im["file_name"]).is_file() for im in coco["images"])
    for style in HPS_STYLES:
        prompts = json.loads(p[style].read_text())
        assert len(prompts) == 5 and all(isinstance(x, str) for x in prompts)
    assert all(parse_caption(x)["n_objects"] == 1 for x in json.loads(p["anime"].read_text()))
    assert all(parse_caption(x)["relation"] == "left of" for x in json.loads(p["paintings"].read_text()))


def test_make_eval_prompts_stops_at_the_distinct_prompts_a_style_has(tmp_path):
    """Asking for more single-object prompts than exist (18) used to loop forever."""
    p = make_eval_prompts(tmp_path, n=4, per_style=30)
    anime = json.loads(p["anime"].read_text())
    assert len(anime) == len(set(anime)) == 18
    assert all(len(json.loads(p[s].read_text())) == 30 for s in HPS_STYLES if s != "anime")
