"""run_curate end to end on the toy world with tiny models in the real architectures (open_clip, BLIP)."""

from __future__ import annotations

import json

import pytest

from sd_distill.curate import CURATED_COLUMNS, CaptionParams, CurateParams, DownloadParams, FilterParams, SourceSpec, read_curated, run_curate
from sd_distill.curate.schema import read_rejects


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from sd_distill.tiny.blip import build_tiny_blip
    from sd_distill.tiny.clip import build_tiny_open_clip

    root = tmp_path_factory.mktemp("curate_models")
    return build_tiny_open_clip(root / "hps", name="curate-tiny-hps"), build_tiny_blip(root / "blip")


@pytest.mark.slow
def test_run_curate_on_the_toy_world_closes_accounting_for_every_source(tmp_path, tiny_models):
    hps, blip = tiny_models
    params = CurateParams(
        sources=[SourceSpec(kind="toy", toy_n=40, toy_seed=3)],
        download=DownloadParams(image_size=32, threads=8),
        filter=FilterParams(hps_model=str(hps), top_fraction=0.75, batch_size=16),
        caption=CaptionParams(captioner=str(blip), max_new_tokens=8, batch_size=16),
        shard_rows=10,
    )
    steps = []
    result = run_curate(params, tmp_path / "run", progress=lambda d, t, m: steps.append(m))
    assert steps == ["collect", "download", "filter", "recaption", "shards", "done"]
    counts = result["counts"]
    # every toy format was read through its real adapter
    assert set(counts["collect"]["per_source"]) == {"toy:laion", "toy:coco", "toy:diffusiondb", "toy:hpdv2_train", "toy:hpdv2_test", "toy:urls"}
    assert counts["collect"]["in"] == 40 and counts["download"]["downloaded"] == 40  # toy images are all fetchable
    kept = read_curated(result["shards_dir"])
    rejects = read_rejects(result["shards_dir"])
    assert list(kept.columns[: len(CURATED_COLUMNS)]) == CURATED_COLUMNS
    assert len(kept) + len(rejects) == 40 and len(kept) == counts["filter"]["kept"] - counts["recaption"]["rejected"]
    # per source: top 75% of each source's scores kept (ceil), the rest rejected by the filter with their score
    for name, c in counts["shards"]["per_source"].items():
        assert c["in"] == c["kept"] + c["rejected"] == counts["collect"]["per_source"][name]["in"]
    filt = rejects[rejects["stage"] == "filter"]
    assert set(filt["reason"]) == {"hps_not_in_top_fraction"} and filt["hps_score"].notna().all()
    assert kept["hps_score"].between(-1, 1).all() and set(kept["hps_version"]) == {"v2.1"}
    assert set(kept["width"]) == {32} and kept["sha256"].is_unique
    assert set(kept["caption_source"]) <= {"original", f"generated:{blip}"}
    assert all("caption_generated" in json.loads(e) for e in kept["extra"])
    summary = result["summary"]
    assert summary["table"][-1]["source"] == "all" and summary["table"][-1]["in"] == 40
    assert summary["table"][-1]["kept"] == len(kept)
    assert len(list((tmp_path / "run" / "5-shards").glob("part-*.parquet"))) == -(-len(kept) // 10)
