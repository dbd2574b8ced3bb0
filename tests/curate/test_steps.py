"""Filter, recaption, shards and summary on hand-made step inputs with injected scorer and captioner."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sd_distill.curate import CURATED_COLUMNS, iter_curated, read_curated, summarize
from sd_distill.curate.collect import SAMPLES_FILE
from sd_distill.curate.config import CaptionParams, CurateParams, FilterParams
from sd_distill.curate.filter import SCORED_FILE, keep_mask, score_and_filter
from sd_distill.curate.recaption import CAPTIONED_FILE, recaption
from sd_distill.curate.schema import read_rejects, rejects_frame, write_rejects
from sd_distill.curate.shards import write_shards
from tests._fixtures_curate import BrightnessScorer, ListCaptioner, write_downloaded

ROWS = [  # key, source, gray level, caption
    ("a1", "A", 250, "a white square"),
    ("a2", "A", 200, "a light square"),
    ("a3", "A", 100, "a gray square"),
    ("a4", "A", 10, "a dark square"),
    ("b1", "B", 60, "b dim"),
    ("b2", "B", 30, "b darker"),
]


def test_keep_mask_threshold_then_top_fraction_per_source_or_global():
    scores = np.array([0.9, 0.8, 0.4, 0.1, 0.3, 0.2], np.float32)
    keys, groups = [r[0] for r in ROWS], [r[1] for r in ROWS]
    kept, reasons = keep_mask(scores, keys, groups, FilterParams(threshold=0.25, top_fraction=0.5, per_source=True))
    assert kept.tolist() == [True, True, False, False, True, False]
    assert reasons == [None, None, "hps_not_in_top_fraction", "hps_below_threshold", None, "hps_below_threshold"]
    kept, _ = keep_mask(scores, keys, groups, FilterParams(threshold=None, top_fraction=0.5, per_source=False))
    assert kept.tolist() == [True, True, True, False, False, False]
    # ties are broken by key, so equal scores give a deterministic cut
    kept, _ = keep_mask(np.ones(4, np.float32), ["d", "b", "a", "c"], ["g"] * 4, FilterParams(top_fraction=0.5))
    assert kept.tolist() == [False, True, True, False]
    kept, _ = keep_mask(np.array([np.nan, 1.0], np.float32), ["x", "y"], ["g", "g"], FilterParams(threshold=0.0, top_fraction=None))
    assert kept.tolist() == [False, True]


def test_score_and_filter_keeps_scores_and_version_and_rejects_with_score(tmp_path):
    write_downloaded(tmp_path / "dl", ROWS)
    scorer = BrightnessScorer()
    params = CurateParams(filter=FilterParams(threshold=0.1, top_fraction=0.5, per_source=True, batch_size=4))
    counts = score_and_filter(params, tmp_path / "dl", tmp_path / "f", scorer=scorer)
    assert scorer.calls == [4, 2]
    kept = pd.read_parquet(tmp_path / "f" / SCORED_FILE)
    assert kept["key"].tolist() == ["a1", "a2", "b1"]
    assert kept["hps_score"].tolist() == pytest.approx([250 / 255, 200 / 255, 60 / 255], abs=1e-6)
    assert set(kept["hps_version"]) == {"v2.1"}
    rejects = read_rejects(tmp_path / "f").set_index("key")
    assert rejects.loc["a3", "reason"] == "hps_not_in_top_fraction" and rejects.loc["a4", "reason"] == "hps_below_threshold"
    assert rejects.loc["a4", "hps_score"] == pytest.approx(10 / 255, abs=1e-6)
    assert rejects.loc["b2", "reason"] == "hps_not_in_top_fraction"
    assert counts["per_source"]["A"]["kept"] == 2 and counts["reasons"] == {"hps_not_in_top_fraction": 2, "hps_below_threshold": 1}
    assert counts["scores"]["max"] == pytest.approx(250 / 255, abs=1e-6)


def _scored(tmp_path, captions):
    rows = [(f"k{i}", "S", 100 + i, c) for i, c in enumerate(captions)]
    write_downloaded(tmp_path / "dl", rows)
    params = CurateParams(filter=FilterParams(top_fraction=None))
    score_and_filter(params, tmp_path / "dl", tmp_path / "f", scorer=BrightnessScorer())
    return tmp_path / "f"


def test_recaption_cleans_generates_and_chooses_by_similarity_with_margin(tmp_path):
    scored = _scored(tmp_path, ["stock photo of a cat IMG_1234.jpg", "a bright moon", "https://spam.example ©2020", "a dull lamp"])
    captioner = ListCaptioner(["a bright cat", "a moon", "", "a bright lamp"])
    params = CurateParams(caption=CaptionParams(margin=0.1, batch_size=3))
    counts = recaption(params, scored, tmp_path / "r", captioner=captioner, scorer=BrightnessScorer())
    out = pd.read_parquet(tmp_path / "r" / CAPTIONED_FILE).set_index("key")
    # k0: the generated caption says "bright" (+0.5 similarity): it wins by more than the margin
    assert out.loc["k0", "caption"] == "a bright cat" and out.loc["k0", "caption_source"] == "generated:toy:blip"
    # k1: the original is the bright one and stays
    assert out.loc["k1", "caption"] == "a bright moon" and out.loc["k1", "caption_source"] == "original"
    # k3: equal similarity except the bright bonus -> generated
    assert out.loc["k3", "caption_source"] == "generated:toy:blip"
    # k2: the original is only boilerplate and the captioner returned nothing: no usable caption
    rejects = read_rejects(tmp_path / "r")
    assert rejects["key"].tolist() == ["k2"] and rejects["reason"].tolist() == ["no_usable_caption"]
    extra = json.loads(out.loc["k0", "extra"])
    assert extra["caption_generated"] == "a bright cat" and extra["sim_generated"] > extra["sim_original"] + 0.1
    assert "similarity" in out.loc["k0", "caption_reason"]
    assert counts["kept"] == 3 and counts["caption_source"] == {"generated:toy:blip": 2, "original": 1}


def test_recaption_margin_keeps_original_and_disabled_keeps_cleaned_original(tmp_path):
    scored = _scored(tmp_path, ["a photo of a cat", "a dog dog dog"])
    recaption(CurateParams(caption=CaptionParams(margin=0.6)), scored, tmp_path / "m", captioner=ListCaptioner(["a bright cat", "x"]), scorer=BrightnessScorer())
    out = pd.read_parquet(tmp_path / "m" / CAPTIONED_FILE)
    assert out["caption_source"].tolist() == ["original", "original"]  # +0.5 does not beat a 0.6 margin
    recaption(CurateParams(caption=CaptionParams(enabled=False)), scored, tmp_path / "d")
    out = pd.read_parquet(tmp_path / "d" / CAPTIONED_FILE)
    assert out["caption"].tolist() == ["a cat", "a dog"]
    assert out["caption_reason"].str.startswith("captioning disabled; cleaned:").all()


def _pipeline_folders(tmp_path):
    """collect / download / filter / recaption folders for 5 collected samples of two sources."""
    collect = tmp_path / "c"
    collect.mkdir()
    samples = pd.DataFrame({"key": ["k0", "k1", "k2", "k3", "k4"], "source": ["S", "S", "S", "T", "T"], "url": ["u"] * 5,
                            "local_path": [None] * 5, "caption_original": ["one", "two", "three", "four", "five"], "extra": ["{}"] * 5})
    samples.to_parquet(collect / SAMPLES_FILE)
    write_rejects(rejects_frame(pd.DataFrame({"key": ["k9"], "source": ["T"], "url": ["u"], "caption_original": [""]}), "collect", "caption_empty"), collect / "rejects.parquet")
    dl = write_downloaded(tmp_path / "d", [(k, s, 50 * i, c) for i, (k, s, c) in enumerate(zip(samples["key"], samples["source"], samples["caption_original"])) if k != "k4"])
    write_rejects(rejects_frame(samples[samples["key"] == "k4"], "download", "http_4xx", "HTTP Error 404: File not found"), dl / "rejects.parquet")
    params = CurateParams(filter=FilterParams(threshold=0.1, top_fraction=None), caption=CaptionParams(enabled=False), shard_rows=2)
    score_and_filter(params, dl, tmp_path / "f", scorer=BrightnessScorer())
    recaption(params, tmp_path / "f", tmp_path / "r")
    return params, [collect, dl, tmp_path / "f"], tmp_path / "r"


def test_write_shards_closes_accounting_per_source_and_splits_parts(tmp_path):
    params, upstream, rec = _pipeline_folders(tmp_path)
    counts = write_shards(params, rec, upstream, tmp_path / "s")
    assert counts["per_source"]["S"] == {"in": 3, "kept": 2, "rejected": 1, "rejected_by_reason": {"filter/hps_below_threshold": 1}}
    assert counts["per_source"]["T"]["in"] == 3 and counts["per_source"]["T"]["rejected_by_reason"] == {
        "collect/caption_empty": 1, "download/http_4xx": 1}
    assert counts["in"] == 6 == counts["kept"] + counts["rejected"]
    parts = sorted((tmp_path / "s").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet"] and counts["shards"] == 2
    df = read_curated(tmp_path / "s")
    assert df.columns.tolist()[: len(CURATED_COLUMNS)] == CURATED_COLUMNS and df["key"].tolist() == ["k1", "k2", "k3"]
    assert [len(b) for b in iter_curated(tmp_path / "s", columns=["key", "caption"], batch_rows=1)] == [1, 1, 1]
    summary = summarize(tmp_path / "s", bins=4)
    row = {r["source"]: r for r in summary["table"]}
    assert row["T"] == {"source": "T", "in": 3, "downloaded": 1, "scored": 1, "kept": 1, "rejected": 2,
                        "rejected:collect": 1, "rejected:download": 1, "rejected:filter": 0, "rejected:recaption": 0}
    assert row["all"]["in"] == 6 and sum(summary["scores"]["all_scored"]["histogram"]["counts"]) == 4
    assert summary["scores"]["kept"]["quantiles"]["n"] == 3
    assert "| T | 3 | 1 | 1 | 1 | 2 | 1 | 1 | 0 | 0 |" in summary["markdown"]
    assert "| T | download | http_4xx | 1 |" in summary["markdown"]
    json.dumps(summary)  # plain data for the Prefect artifact


def test_write_shards_refuses_when_a_sample_was_lost(tmp_path):
    params, upstream, rec = _pipeline_folders(tmp_path)
    (upstream[1] / "rejects.parquet").unlink()  # the 404 reject vanished: k4 is nowhere
    with pytest.raises(AssertionError, match="1 collected samples are neither kept nor rejected"):
        write_shards(params, rec, upstream, tmp_path / "s")


def test_read_curated_names_missing_and_mistyped_columns(tmp_path):
    params, upstream, rec = _pipeline_folders(tmp_path)
    write_shards(params, rec, upstream, tmp_path / "s")
    part = tmp_path / "s" / "part-00000.parquet"
    table = pq.read_table(part).drop_columns(["hps_version"])
    table = table.set_column(table.schema.get_field_index("width"), "width", pa.array([str(w) for w in table["width"].to_pylist()]))
    pq.write_table(table, part)
    with pytest.raises(ValueError, match=r"part-00000.parquet: not a curated shard: column 'width' is string, expected integer; missing column 'hps_version'"):
        read_curated(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="no part-"):
        read_curated(tmp_path)


def test_run_curate_when_nothing_survives_collect_writes_empty_valid_outputs(tmp_path):
    from sd_distill.curate import SourceSpec, run_curate
    from tests._fixtures_curate import ListCaptioner

    (tmp_path / "empty.csv").write_text("url,caption\n")
    (tmp_path / "l.csv").write_text("url,caption\nhttp://h/1.png,\nhttp://h/2.png,   \n")
    params = CurateParams(sources=[SourceSpec(kind="url_list", path=str(tmp_path / "l.csv")), SourceSpec(kind="url_list", path=str(tmp_path / "empty.csv"), name="empty")])
    result = run_curate(params, tmp_path / "run", scorer=BrightnessScorer(), captioner=ListCaptioner([]))
    assert result["counts"]["shards"]["per_source"] == {"url_list": {"in": 2, "kept": 0, "rejected": 2, "rejected_by_reason": {"collect/caption_empty": 2}}}
    assert result["counts"]["collect"]["per_source"]["empty"]["in"] == 0
    assert len(read_curated(result["shards_dir"])) == 0
    assert result["summary"]["table"][-1] == {"source": "all", "in": 2, "downloaded": 0, "scored": 0, "kept": 0, "rejected": 2,
                                              "rejected:collect": 2, "rejected:download": 0, "rejected:filter": 0, "rejected:recaption": 0}


def test_recaption_in_chunks_matches_one_pass(tmp_path):
    captions = [f"a {'bright ' if i % 3 == 0 else ''}thing {i}" for i in range(20)]
    scored = _scored(tmp_path, [f"thing {i}" for i in range(20)])
    small = CurateParams(caption=CaptionParams(batch_size=1), filter=FilterParams(batch_size=1))  # chunks of 8 images
    cap = ListCaptioner(captions)
    recaption(small, scored, tmp_path / "small", captioner=cap, scorer=BrightnessScorer())
    assert cap.calls == [8, 8, 4]
    recaption(CurateParams(), scored, tmp_path / "big", captioner=ListCaptioner(captions), scorer=BrightnessScorer())
    a = pd.read_parquet(tmp_path / "small" / CAPTIONED_FILE)
    b = pd.read_parquet(tmp_path / "big" / CAPTIONED_FILE)
    assert a[["key", "caption", "caption_source", "extra"]].equals(b[["key", "caption", "caption_source", "extra"]])
    assert (a["caption_source"] != "original").sum() == 7  # the "bright" captions win
