"""Source adapters on fixture files in the published formats, malformed files, and collect's row checks."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from pydantic import ValidationError

from sd_distill.curate.collect import SAMPLES_FILE, collect_sources
from sd_distill.curate.config import CurateParams, SourceSpec
from sd_distill.curate.schema import read_rejects
from sd_distill.curate.sources import SourceFormatError, read_source
from tests._fixtures_curate import write_coco_json, write_diffusiondb, write_hpdv2, write_laion_parquet


def test_laion_parquet_keeps_url_text_and_every_other_column_as_extra(tmp_path):
    p = write_laion_parquet(tmp_path / "laion.parquet", ["http://x/a.jpg", "http://x/b.jpg"], ["a cat", "a dog"])
    df = read_source(SourceSpec(kind="laion_parquet", path=str(p)))
    assert df["url"].tolist() == ["http://x/a.jpg", "http://x/b.jpg"]
    assert df["caption_raw"].tolist() == ["a cat", "a dog"]
    extra = json.loads(df["extra"][1])
    assert extra["WIDTH"] == 512 and extra["aesthetic"] == pytest.approx(8.0) and extra["LANGUAGE"] == "en"


def test_laion_parquet_missing_text_column_names_file_and_column(tmp_path):
    p = tmp_path / "bad.parquet"
    pd.DataFrame({"URL": ["http://x/a.jpg"], "caption": ["a"]}).to_parquet(p)
    with pytest.raises(SourceFormatError, match=r"bad\.parquet: missing columns \['TEXT'\]"):
        read_source(SourceSpec(kind="laion_parquet", path=str(p)))


def test_laion_parquet_that_is_not_parquet_is_a_clear_error(tmp_path):
    p = tmp_path / "fake.parquet"
    p.write_text("URL,TEXT\n")
    with pytest.raises(SourceFormatError, match="fake.parquet: not a readable Parquet file"):
        read_source(SourceSpec(kind="laion_parquet", path=str(p)))


def test_coco_first_caption_per_image_vs_all_captions_with_urls_or_local_root(tmp_path):
    p = write_coco_json(tmp_path / "captions_train2017.json", ["1.jpg", "2.jpg"], [["c1a", "c1b"], ["c2a"]], "http://images.cocodataset.org/train2017")
    first = read_source(SourceSpec(kind="coco_json", path=str(p)))
    assert first["caption_raw"].tolist() == ["c1a", "c2a"]
    assert first["url"].tolist() == ["http://images.cocodataset.org/train2017/1.jpg", "http://images.cocodataset.org/train2017/2.jpg"]
    every = read_source(SourceSpec(kind="coco_json", path=str(p), coco_captions="all"))
    assert every["caption_raw"].tolist() == ["c1a", "c1b", "c2a"]
    assert [json.loads(e)["annotation_id"] for e in every["extra"]] == [1000, 1001, 1002]
    local = read_source(SourceSpec(kind="coco_json", path=str(p), images_root=str(tmp_path / "train2017")))
    assert local["url"].isna().all()
    assert local["local_path"].tolist() == [str(tmp_path / "train2017" / "1.jpg"), str(tmp_path / "train2017" / "2.jpg")]


def test_coco_bad_json_and_missing_keys_are_clear_errors(tmp_path):
    p = tmp_path / "captions.json"
    p.write_text('{"images": [}')
    with pytest.raises(SourceFormatError, match=r"captions.json: invalid JSON at line 1 column 13"):
        read_source(SourceSpec(kind="coco_json", path=str(p)))
    p.write_text(json.dumps({"images": []}))
    with pytest.raises(SourceFormatError, match="needs top-level 'images' and 'annotations'"):
        read_source(SourceSpec(kind="coco_json", path=str(p)))
    p.write_text(json.dumps({"images": [{"id": 1, "coco_url": "http://x/1.jpg"}], "annotations": [{"image_id": 2, "caption": "c"}]}))
    with pytest.raises(SourceFormatError, match="refers to image_id 2 not in 'images'"):
        read_source(SourceSpec(kind="coco_json", path=str(p)))


def test_diffusiondb_rows_point_into_the_part_zip(tmp_path):
    meta = write_diffusiondb(tmp_path / "ddb", 3)
    df = read_source(SourceSpec(kind="diffusiondb", path=str(tmp_path / "ddb")))
    assert len(df) == 3 and df["url"].isna().all()
    zip_path = tmp_path / "ddb" / "images" / "part-000001.zip"
    assert df["local_path"][0].startswith("zip://") and df["local_path"][0].endswith(f"::{zip_path}")
    import fsspec

    with fsspec.open(df["local_path"][2], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    extra = json.loads(df["extra"][0])
    assert extra["part_id"] == 1 and extra["cfg"] == 7.0 and extra["image_name"].endswith(".png")
    assert read_source(SourceSpec(kind="diffusiondb", path=str(meta), images_root="https://h/ddb"))["url"][0].startswith("https://h/ddb/part-000001/")


def test_diffusiondb_missing_prompt_column_is_a_clear_error(tmp_path):
    p = tmp_path / "metadata.parquet"
    pd.DataFrame({"image_name": ["a.png"], "part_id": [1]}).to_parquet(p)
    with pytest.raises(SourceFormatError, match=r"metadata.parquet: missing columns \['prompt'\]"):
        read_source(SourceSpec(kind="diffusiondb", path=str(p)))


def test_hpdv2_train_and_test_keep_the_preferred_image_or_all(tmp_path):
    train = write_hpdv2(tmp_path, 2, "train")
    df = read_source(SourceSpec(kind="hpdv2", path=str(train)))
    # entry 0 prefers its first image, entry 1 its second
    assert df["local_path"].tolist() == [str(tmp_path / "train" / "img800.png"), str(tmp_path / "train" / "img803.png")]
    assert df["caption_raw"].tolist() == ["hpd prompt 0", "hpd prompt 1"]
    assert len(read_source(SourceSpec(kind="hpdv2", path=str(train), hpdv2_images="all"))) == 4
    test = write_hpdv2(tmp_path, 1, "test")
    df = read_source(SourceSpec(kind="hpdv2", path=str(test)))
    assert df["local_path"].tolist() == [str(tmp_path / "test" / "img801.png")]  # rank 1 is best
    assert json.loads(df["extra"][0])["rank"] == 1


def test_hpdv2_entry_without_image_list_is_a_clear_error(tmp_path):
    p = tmp_path / "train.json"
    p.write_text(json.dumps([{"prompt": "x", "images": ["a.jpg"]}]))
    with pytest.raises(SourceFormatError, match=r"entry \[0\] needs 'file_path' \(train.json\) or 'image_path'"):
        read_source(SourceSpec(kind="hpdv2", path=str(p)))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl"])
def test_url_list_reads_each_format_with_configured_columns(tmp_path, fmt):
    df = pd.DataFrame({"link": ["http://h/1.png", "http://h/2.png"], "alt": ["one", "two"], "score": ["1", "2"]})
    p = tmp_path / f"list.{fmt}"
    if fmt == "csv":
        df.to_csv(p, index=False)
    elif fmt == "tsv":
        df.to_csv(p, index=False, sep="\t")
    elif fmt == "parquet":
        df.to_parquet(p)
    else:
        df.to_json(p, orient="records", lines=True)
    out = read_source(SourceSpec(kind="url_list", path=str(p), url_col="link", caption_col="alt"))
    assert out["url"].tolist() == ["http://h/1.png", "http://h/2.png"]
    assert out["caption_raw"].tolist() == ["one", "two"]
    assert json.loads(out["extra"][0]) == {"score": "1"}


def test_url_list_missing_caption_column_and_bad_jsonl_line_are_clear_errors(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("url,text\nhttp://h/1.png,one\n")
    with pytest.raises(SourceFormatError, match=r"l.csv: missing columns \['caption'\]"):
        read_source(SourceSpec(kind="url_list", path=str(p)))
    j = tmp_path / "l.jsonl"
    j.write_text('{"url": "http://h/1.png", "caption": "a"}\n{"url": \n')
    with pytest.raises(SourceFormatError, match="l.jsonl: invalid JSON on line 2"):
        read_source(SourceSpec(kind="url_list", path=str(j)))


def test_unknown_kind_fails_with_the_valid_choices():
    with pytest.raises(ValidationError, match="laion_parquet.*coco_json.*url_list"):
        SourceSpec(kind="flickr", path="x")


def test_collect_rejects_bad_captions_and_duplicate_urls_and_accounting_closes(tmp_path):
    urls = [f"http://h/{i}.png" for i in range(7)] + ["http://h/0.png", "ftp://h/x.png"]
    caps = ["ok zero", "", "   ", "x" * 50, b"\xff\xfe bad bytes", "ok five", "ok six", "dup of zero", "ok ftp"]
    a = write_laion_parquet(tmp_path / "a.parquet", urls, caps)
    b = tmp_path / "b.csv"
    b.write_bytes(b"url,caption\nhttp://h/5.png,again five\nhttp://h/9.png,caf\xe9 latin-1\nhttp://h/10.png,fine\n")
    params = CurateParams(
        sources=[SourceSpec(kind="laion_parquet", path=str(a), name="laion"), SourceSpec(kind="url_list", path=str(b), name="list")],
        max_caption_chars=40,
    )
    counts = collect_sources(params, tmp_path / "out")
    samples = pd.read_parquet(tmp_path / "out" / SAMPLES_FILE)
    rejects = read_rejects(tmp_path / "out")
    assert samples["caption_original"].tolist() == ["ok zero", "ok five", "ok six", "fine"]
    by_reason = rejects.groupby("reason")["key"].count().to_dict()
    assert by_reason == {
        "caption_empty": 2, "caption_too_long": 1, "caption_not_utf8": 2, "duplicate_url": 2, "unsupported_scheme": 1
    }
    dup = rejects[rejects["reason"] == "duplicate_url"]
    assert set(dup["detail"]) <= set(samples["key"])  # points at the kept row, across sources too
    assert counts["per_source"]["laion"] == {**counts["per_source"]["laion"], "in": 9, "kept": 3, "rejected": 6}
    assert counts["per_source"]["list"]["in"] == 3 and counts["per_source"]["list"]["kept"] == 1
    assert counts["in"] == len(samples) + len(rejects) == 12
    assert samples["key"].is_unique and set(samples["key"]).isdisjoint(rejects["key"])


def test_collect_keys_are_stable_across_runs(tmp_path):
    a = write_laion_parquet(tmp_path / "a.parquet", ["http://h/1.png", "http://h/2.png"], ["one", "two"])
    params = CurateParams(sources=[SourceSpec(kind="laion_parquet", path=str(a))])
    collect_sources(params, tmp_path / "r1")
    collect_sources(params, tmp_path / "r2")
    k1 = pd.read_parquet(tmp_path / "r1" / SAMPLES_FILE)["key"].tolist()
    assert k1 == pd.read_parquet(tmp_path / "r2" / SAMPLES_FILE)["key"].tolist() and len(set(k1)) == 2


def test_collect_validates_every_source_before_writing_anything(tmp_path):
    good = write_laion_parquet(tmp_path / "a.parquet", ["http://h/1.png"], ["one"])
    bad = tmp_path / "coco.json"
    bad.write_text("not json")
    params = CurateParams(sources=[SourceSpec(kind="laion_parquet", path=str(good)), SourceSpec(kind="coco_json", path=str(bad))])
    with pytest.raises(SourceFormatError, match="coco.json: invalid JSON"):
        collect_sources(params, tmp_path / "out")
    assert not (tmp_path / "out" / SAMPLES_FILE).exists()


def test_sources_read_from_fsspec_urls(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    local = write_laion_parquet(tmp_path / "a.parquet", ["http://h/1.png"], ["from memory"])
    fs.pipe("/curate-test/laion/part-0.parquet", local.read_bytes())
    fs.pipe("/curate-test/laion/part-1.parquet", local.read_bytes())
    df = read_source(SourceSpec(kind="laion_parquet", path="memory://curate-test/laion"))
    assert df["caption_raw"].tolist() == ["from memory", "from memory"]  # a folder of parquet parts
    fs.pipe("/curate-test/l.jsonl", b'{"url": "http://h/2.png", "caption": "jsonl in memory"}\n')
    assert read_source(SourceSpec(kind="url_list", path="memory://curate-test/l.jsonl"))["url"].tolist() == ["http://h/2.png"]
    with pytest.raises(SourceFormatError, match="memory://curate-test/none.csv: file not found"):
        read_source(SourceSpec(kind="url_list", path="memory://curate-test/none.csv"))


def test_toy_sources_keep_stable_keys_and_relative_local_paths_when_the_folder_moves(tmp_path):
    import shutil

    from sd_distill.curate.download import resolve_local_path

    params = CurateParams(sources=[SourceSpec(kind="toy", toy_n=12, toy_seed=5)])
    collect_sources(params, tmp_path / "a.tmp-123")
    collect_sources(params, tmp_path / "b")
    a = pd.read_parquet(tmp_path / "a.tmp-123" / SAMPLES_FILE)
    b = pd.read_parquet(tmp_path / "b" / SAMPLES_FILE)
    assert a["key"].tolist() == b["key"].tolist() and len(a) == 12
    local = a["local_path"].dropna().tolist()
    assert local and not any(str(tmp_path) in p for p in local)  # relative to the collect folder
    shutil.move(tmp_path / "a.tmp-123", tmp_path / "a")  # the stage store renames the folder when done
    import fsspec

    for p in local:
        with fsspec.open(resolve_local_path(p, tmp_path / "a"), "rb") as f:
            assert f.read(4) == b"\x89PNG"
