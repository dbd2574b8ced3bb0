"""The latent cache: curated shards -> VAE latents + text embeddings, read back as training batches."""

from __future__ import annotations

import json

import pytest
import torch

from sd_distill.distill.data import LatentDataset, build_latent_cache, image_tensor, micro_batch_indices
from tests._fixtures_distill import CAPTIONS, png_bytes, write_tiny_curated


def test_cache_holds_every_curated_row_with_vae_latents_and_text_embeddings(tiny_cache, tiny_teacher, tiny_curated):
    import pandas as pd
    import pyarrow.parquet as pq

    from sd_distill.distill.data import encode_pixels
    from sd_distill.distill.teacher import encode_prompts, load_teacher

    index = json.loads((tiny_cache / "index.json").read_text())
    assert index["num_samples"] == 12 and index["resolution"] == 32
    assert [s["rows"] for s in index["shards"]] == [12]
    ds = LatentDataset(tiny_cache)
    batch = ds.batch([0, 5])
    assert batch["latents"].shape == (2, 4, 8, 8)
    assert batch["prompt_embeds"].shape == (2, 77, 32)
    assert batch["negative_embeds"].shape == (2, 77, 32)
    # the cached values are what the teacher's own VAE (posterior mean x scaling_factor) and text encoder give
    teacher = load_teacher(str(tiny_teacher))
    rows = pd.read_parquet(tiny_cache / "samples.parquet")
    assert rows.caption.tolist()[:4] == CAPTIONS and rows.key[0] == "toy-00000"
    torch.testing.assert_close(batch["prompt_embeds"][1:2], encode_prompts(teacher, [rows.caption[5]]))
    torch.testing.assert_close(batch["negative_embeds"][:1], encode_prompts(teacher, [""]))
    first = pq.read_table(tiny_curated / "part-00000.parquet").to_pylist()[0]
    mean, _ = encode_pixels(teacher.vae, image_tensor(first["image"], 32)[None])
    torch.testing.assert_close(batch["latents"][:1], mean * 1.0)
    assert index["scaling_factor"] == teacher.vae.config.scaling_factor


def test_image_tensor_resizes_shorter_side_and_center_crops():
    import numpy as np

    img = image_tensor(png_bytes(np.random.default_rng(1), 60, 40), 32)
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8


def test_posterior_sampling_draws_around_the_mean_with_the_generator(tiny_cache):
    ds = LatentDataset(tiny_cache)
    a = ds.batch([1, 2], torch.Generator().manual_seed(3), sample_posterior=True)["latents"]
    b = ds.batch([1, 2], torch.Generator().manual_seed(3), sample_posterior=True)["latents"]
    mean = ds.batch([1, 2])["latents"]
    assert torch.equal(a, b) and not torch.equal(a, mean)


def test_empty_curated_folder_fails_with_a_clear_error(tmp_path, tiny_teacher):
    (tmp_path / "curated").mkdir()
    with pytest.raises(ValueError, match="empty dataset: no part-\\*.parquet"):
        build_latent_cache(str(tiny_teacher), tmp_path / "curated", tmp_path / "cache", resolution=32)


def test_dataset_of_only_undecodable_images_fails_and_counts_them(tmp_path, tiny_teacher):
    curated = write_tiny_curated(tmp_path / "curated", n=3, bad_images=3)
    with pytest.raises(ValueError, match="no usable samples.*undecodable_image"):
        build_latent_cache(str(tiny_teacher), curated, tmp_path / "cache", resolution=32)


def test_bad_rows_are_counted_and_max_samples_caps_the_read(tmp_path, tiny_teacher):
    curated = write_tiny_curated(tmp_path / "curated", n=10, rows_per_shard=4, bad_images=2)
    out = build_latent_cache(str(tiny_teacher), curated, tmp_path / "cache", resolution=32, max_samples=7,
                             shard_rows=3, batch_size=2, cache_latents=False)
    assert out["rows_read"] == 7 and out["samples"] == 5 and out["skipped"] == {"undecodable_image": 2}
    ds = LatentDataset(tmp_path / "cache")
    assert len(ds) == 5 and ds.batch([4])["pixels"].shape == (1, 3, 32, 32)


def test_shard_missing_caption_column_names_the_file_and_column(tmp_path, tiny_teacher):
    curated = write_tiny_curated(tmp_path / "curated", n=2)
    with pytest.raises(ValueError, match="part-00000.parquet.*'prompt'"):
        build_latent_cache(str(tiny_teacher), curated, tmp_path / "cache", caption_column="prompt")


def test_missing_cache_is_reported_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a latent cache"):
        LatentDataset(tmp_path)


def test_micro_batches_cover_each_epoch_once_and_split_across_processes():
    n, b = 10, 2
    epoch = [i for p in range(5) for i in micro_batch_indices(n, b, p, seed=0)]
    assert sorted(epoch) == list(range(n))
    two = [micro_batch_indices(n, b, 0, 0, rank=r, world=2) for r in range(2)]
    assert two[0] + two[1] == micro_batch_indices(n, 4, 0, 0)
    assert micro_batch_indices(n, b, 7, seed=0) == micro_batch_indices(n, b, 7, seed=0)
    assert micro_batch_indices(n, b, 5, 0) != micro_batch_indices(n, b, 5, 1) or micro_batch_indices(n, b, 6, 0) != micro_batch_indices(n, b, 6, 1)


def test_native_resolution_is_unet_sample_size_times_the_vae_factor(tiny_teacher):
    from sd_distill.distill.data import native_resolution
    from sd_distill.distill.teacher import load_teacher

    assert native_resolution(load_teacher(str(tiny_teacher))) == 32  # 8x8 latents, VAE with 3 blocks (/4)


def test_mistyped_image_column_is_rejected_naming_the_file(tmp_path, tiny_teacher):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "curated").mkdir()
    pq.write_table(pa.table({"key": ["a"], "image": ["not bytes"], "caption": ["a red circle"]}),
                   tmp_path / "curated" / "part-00000.parquet")
    with pytest.raises(ValueError, match="part-00000.parquet.*'image'"):
        build_latent_cache(str(tiny_teacher), tmp_path / "curated", tmp_path / "cache", resolution=32)
