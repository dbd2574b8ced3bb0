"""WebDataset in and out: img2dataset-style tar shards as a source, and the curated set written as tar shards."""

from __future__ import annotations

import hashlib
import io
import json

import fsspec
import pandas as pd
import pytest
from PIL import Image

from sd_distill.curate import CaptionParams, CurateParams, DownloadParams, FilterParams, SourceSpec, read_curated, run_curate
from sd_distill.curate.collect import SAMPLES_FILE, collect_sources
from sd_distill.curate.schema import read_rejects
from sd_distill.curate.sources import SourceFormatError, read_source
from sd_distill.curate.wds import WebDatasetWriter, read_shard_samples, shard_pattern, split_member
from tests._fixtures_curate import BrightnessScorer, webdataset_sample, write_webdataset_shard


def _shards(folder, n_shards=2, per_shard=3):
    """``n_shards`` clean shards of ``per_shard`` samples each (png, jpg, webp in turn)."""
    exts = ("png", "jpg", "webp")
    for s in range(n_shards):
        samples = [webdataset_sample(s * per_shard + i, ext=exts[i % 3]) for i in range(per_shard)]
        write_webdataset_shard(folder / f"shards-{s:05d}.tar", samples)
    return folder


def _collect(tmp_path, path, **spec):
    params = CurateParams(sources=[SourceSpec(kind="webdataset", path=str(path), name="wds", **spec)])
    counts = collect_sources(params, tmp_path / "collect")
    samples = pd.read_parquet(tmp_path / "collect" / SAMPLES_FILE)
    return counts, samples, read_rejects(tmp_path / "collect")


def test_member_names_split_at_the_first_dot_of_the_base_name():
    assert split_member("000000012.jpg") == ("000000012", "jpg")
    assert split_member("part/000000012.seg.PNG") == ("part/000000012", "seg.png")
    assert split_member("README") == ("README", "")


def test_folder_brace_pattern_and_fsspec_url_give_the_same_rows(tmp_path):
    folder = _shards(tmp_path / "wds")
    counts, samples, rejects = _collect(tmp_path, folder)
    assert counts["in"] == 6 == len(samples) and len(rejects) == 0
    # images stay in the shards, named as tar members; the json's url is kept for provenance
    assert samples["local_path"].tolist()[0] == f"tar://000000000.png::{folder / 'shards-00000.tar'}"
    assert samples["url"].tolist()[:2] == ["http://img.example/0.png", "http://img.example/1.jpg"]
    extra = json.loads(samples["extra"][1])
    assert extra["wds_key"] == "000000001" and extra["similarity"] == pytest.approx(0.31)
    assert extra["members"] == ["jpg", "json", "txt"] and "caption" not in extra
    brace = read_source(SourceSpec(kind="webdataset", path=str(folder / "shards-{00000..00001}.tar")))
    assert brace["local_path"].tolist() == samples["local_path"].tolist()
    fs = fsspec.filesystem("memory")
    for f in sorted(folder.iterdir()):
        fs.pipe(f"/wds-test/{f.name}", f.read_bytes())
    remote = read_source(SourceSpec(kind="webdataset", path="memory://wds-test/shards-{00000..00001}.tar"))
    assert remote["caption_raw"].tolist() == [c.encode() for c in samples["caption_original"]]
    assert remote["local_path"][0] == "tar://000000000.png::memory://wds-test/shards-00000.tar"
    assert len(read_source(SourceSpec(kind="webdataset", path=str(folder), max_rows=4))) == 4


def test_broken_samples_become_rejects_and_the_rest_is_kept(tmp_path):
    key, good = webdataset_sample(0)
    no_txt = webdataset_sample(1)[1]
    del no_txt["txt"]  # the caption survives in img2dataset's json
    no_caption = {"png": webdataset_sample(2)[1]["png"], "json": {"url": "http://img.example/2.png"}}
    no_image = {"txt": "a caption without its picture", "json": {"url": "http://img.example/3.png"}}
    bad_utf8 = {**webdataset_sample(4)[1], "txt": b"caf\xe9 au lait"}
    bad_json = {**webdataset_sample(5)[1], "json": b"{not json"}
    again = webdataset_sample(6, caption="same url as sample 0")[1]
    again["json"]["url"] = good["json"]["url"]
    write_webdataset_shard(tmp_path / "wds" / "a.tar", [(key, good), ("000000001", no_txt), ("000000002", no_caption),
                                                        ("000000003", no_image), ("000000004", bad_utf8),
                                                        ("000000005", bad_json), ("000000006", again)])
    counts, samples, rejects = _collect(tmp_path, tmp_path / "wds")
    detail = rejects.set_index("reason")["detail"]
    assert sorted(detail.index) == ["caption_missing", "caption_not_utf8", "duplicate_url", "image_missing"]
    assert detail["caption_missing"].startswith("sample '000000002' has no .txt member")
    assert detail["image_missing"] == "sample '000000003' has members ['json', 'txt'], no jpg/jpeg/png/webp"
    assert detail["duplicate_url"] == samples["key"][0]
    assert samples["caption_original"].tolist() == ["a picture number 0", "a picture number 1", "a picture number 5"]
    assert "json_error" in json.loads(samples["extra"][2])
    assert counts["in"] == 7 == len(samples) + len(rejects)


def test_a_truncated_shard_keeps_its_complete_samples_and_other_shards(tmp_path):
    folder = _shards(tmp_path / "wds", n_shards=2, per_shard=4)
    shard = folder / "shards-00001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # cut inside the third sample
    samples, damage = read_shard_samples(str(shard))
    assert "end of data" in damage or "truncated" in damage
    counts, kept, rejects = _collect(tmp_path, folder)
    assert len(kept) == 4 + len(samples) - 1 and rejects["reason"].tolist() == ["tar_damaged"]
    assert "shards-00001.tar breaks off in sample" in rejects["detail"][0]
    assert counts["in"] == len(kept) + len(rejects)


def test_unreadable_shards_and_missing_ones_are_errors_naming_the_file(tmp_path):
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "bad.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(SourceFormatError, match=r"bad.tar: not a readable tar file"):
        read_source(SourceSpec(kind="webdataset", path=str(tmp_path / "wds")))
    _shards(tmp_path / "ok", n_shards=1)
    with pytest.raises(SourceFormatError, match=r"1 of 2 shards do not exist"):
        read_source(SourceSpec(kind="webdataset", path=str(tmp_path / "ok" / "shards-{00000..00001}.tar")))
    with pytest.raises(SourceFormatError, match="folder holds no"):
        read_source(SourceSpec(kind="webdataset", path=str(tmp_path)))


def _curated_rows(n):
    rows = []
    for i in range(n):
        key, members = webdataset_sample(i, ext="png" if i % 2 else "jpg")
        data = members["png" if i % 2 else "jpg"]
        rows.append({"key": key, "source": "wds", "url": members["json"]["url"], "image": data, "width": 24, "height": 24,
                     "sha256": hashlib.sha256(data).hexdigest(), "caption_original": f"orig {i}", "caption": f"train {i}",
                     "caption_source": "original", "hps_score": 0.25 + i, "hps_version": "v2.1",
                     "extra": json.dumps({"similarity": 0.3})})
    return rows


def test_writer_shards_by_size_and_webdataset_reads_every_sample_back(tmp_path):
    wds = pytest.importorskip("webdataset")
    rows = _curated_rows(5)
    with WebDatasetWriter(tmp_path / "out", samples_per_shard=2) as writer:
        writer.write(rows[:3])
        writer.write(rows[3:])
    assert [s["samples"] for s in writer.shards] == [2, 2, 1]
    assert all(s["sha256"] == hashlib.sha256((tmp_path / "out" / s["path"]).read_bytes()).hexdigest() for s in writer.shards)
    pattern = shard_pattern(writer.shards)
    assert pattern == "shards-{00000..00002}.tar"
    read = list(wds.WebDataset(str(tmp_path / "out" / pattern), shardshuffle=False))
    assert [s["__key__"] for s in read] == [r["key"] for r in rows]
    assert [sorted(k for k in s if not k.startswith("__")) for s in read[:2]] == [["jpg", "json", "txt"], ["json", "png", "txt"]]
    assert read[1]["png"] == rows[1]["image"] and read[1]["txt"] == b"train 1"
    meta = json.loads(read[1]["json"])
    assert meta["caption_original"] == "orig 1" and meta["hps_score"] == 1.25 and meta["extra"] == {"similarity": 0.3}
    assert {"caption_source", "hps_version", "source", "url", "width", "height", "sha256"} <= set(meta)
    # deterministic headers: the same rows give byte-identical shards
    again = WebDatasetWriter(tmp_path / "again", samples_per_shard=2)
    again.write(rows)
    assert [s["sha256"] for s in again.close()] == [s["sha256"] for s in writer.shards]


def test_output_formats_must_include_parquet_and_the_shards_key_only_grows_when_webdataset_is_asked():
    with pytest.raises(ValueError, match="must include 'parquet'"):
        CurateParams(output_formats=["webdataset"])
    with pytest.raises(ValueError, match="webdataset"):
        CurateParams(output_formats=["parquet", "tfrecord"])
    assert CurateParams(shard_rows=7).shards_key() == {"shard_rows": 7}
    assert CurateParams(output_formats=["parquet", "webdataset"], webdataset_shard_size=3).shards_key() == {
        "shard_rows": 5000, "output_formats": ["parquet", "webdataset"], "webdataset_shard_size": 3}


@pytest.mark.slow  # one img2dataset run (~3 interpreters)
def test_run_curate_from_webdataset_shards_to_webdataset_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    folder = _shards(tmp_path / "in", n_shards=2, per_shard=4)
    # a copy of sample 0's image under another key and url: same bytes, so a duplicate after resizing
    key, dup = webdataset_sample(0, caption="the same picture again")
    dup["json"]["url"] = "http://img.example/copy.png"
    broken = {"png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "txt": "half a png", "json": {"url": "http://img.example/b.png"}}
    write_webdataset_shard(folder / "shards-00002.tar", [("000000100", dup), ("000000101", broken)])
    params = CurateParams(
        sources=[SourceSpec(kind="webdataset", path=str(folder), name="wds")],
        download=DownloadParams(image_size=16, threads=4, retries=0),
        filter=FilterParams(threshold=None, top_fraction=0.75),
        caption=CaptionParams(enabled=False),
        output_formats=["parquet", "webdataset"], webdataset_shard_size=2,
    )
    result = run_curate(params, tmp_path / "run", scorer=BrightnessScorer())
    counts = result["counts"]
    kept, rejects = read_curated(result["shards_dir"]), read_rejects(result["shards_dir"])
    assert counts["collect"]["in"] == 10 == len(kept) + len(rejects)
    assert counts["shards"]["per_source"]["wds"]["in"] == 10
    assert set(rejects["reason"]) == {"duplicate_image", "not_an_image", "hps_not_in_top_fraction"}
    assert rejects.set_index("reason").loc["duplicate_image", "detail"] == kept.loc[kept["url"] == "http://img.example/0.png", "key"].item()
    assert len(kept) == 6  # 8 decodable distinct images, the best 75% by score
    for data in kept["image"]:  # resized like every downloaded image
        assert Image.open(io.BytesIO(data)).size == (16, 16)
    out = counts["shards"]["webdataset"]
    assert out["pattern"] == "webdataset/shards-{00000..00002}.tar" and out["samples"] == 6
    assert [s["samples"] for s in out["shards"]] == [2, 2, 2]
    read = list(wds.WebDataset(str(tmp_path / "run" / "5-shards" / out["pattern"]), shardshuffle=False))
    assert [s["__key__"] for s in read] == kept["key"].tolist()
    assert [s["txt"].decode() for s in read] == kept["caption"].tolist()
    assert [s["png"] for s in read] == kept["image"].tolist()
    meta = [json.loads(s["json"]) for s in read]
    assert [m["hps_score"] for m in meta] == pytest.approx(kept["hps_score"].tolist(), abs=1e-6)
    assert {m["source"] for m in meta} == {"wds"} and meta[0]["extra"]["wds_key"]
    assert all(m["caption_source"] == "original" and m["url"].startswith("http://img.example/") for m in meta)
