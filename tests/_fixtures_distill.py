"""Shared fixtures for the distill trainer tests: a tiny teacher folder, a tiny curated dataset, its cache.

Import the fixtures you use into the test module (``from tests._fixtures_distill import tiny_teacher, ...``).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread: on the shared 2-core CI box two contending threads made a tiny UNet step ~20x slower.
import torch  # noqa: E402

torch.set_num_threads(1)

WORDS = ["red", "green", "blue", "circle", "square", "on", "a", "background", "white", "black"]
CAPTIONS = ["a red circle", "a blue square", "a green circle on white", "a black square on blue"]


def png_bytes(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A PNG of a random colour field with a bright rectangle (distinct images, real encoded bytes)."""
    from PIL import Image

    arr = np.empty((height, width, 3), dtype=np.uint8)
    arr[:] = rng.integers(0, 256, size=3, dtype=np.uint8)
    y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
    arr[y : y + height // 2, x : x + width // 2] = rng.integers(128, 256, size=3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_tiny_curated(folder: Path, n: int = 12, rows_per_shard: int = 8, seed: int = 0, bad_images: int = 0) -> Path:
    """Curated shards with the columns of docs/design.md (non-square images of varying size; ``bad_images`` undecodable rows)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w, h = int(rng.integers(32, 64)), int(rng.integers(32, 64))
        image = b"not an image" if i < bad_images else png_bytes(rng, w, h)
        caption = CAPTIONS[i % len(CAPTIONS)]
        rows.append({
            "key": f"toy-{i:05d}", "source": "toy", "url": f"served://toy/{i}.png", "image": image,
            "width": w, "height": h, "sha256": hashlib.sha256(image).hexdigest(), "caption_original": caption,
            "caption": caption, "caption_source": "original", "hps_score": 0.25, "hps_version": "v2.1",
        })
    for s in range(0, n, rows_per_shard):
        pq.write_table(pa.Table.from_pylist(rows[s : s + rows_per_shard]), folder / f"part-{s // rows_per_shard:05d}.parquet")
    return folder


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """An epsilon-prediction tiny SD pipeline folder (32 px images, 8x8 latents)."""
    from sd_distill.tiny.sd import build_tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("teacher") / "tiny-sd"
    build_tiny_sd_pipeline(folder, prediction_type="epsilon", words=WORDS)
    return folder


@pytest.fixture(scope="session")
def tiny_curated(tmp_path_factory) -> Path:
    return write_tiny_curated(tmp_path_factory.mktemp("curated"), n=12)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_teacher, tiny_curated) -> Path:
    from sd_distill.distill.data import build_latent_cache

    out = tmp_path_factory.mktemp("cache")
    build_latent_cache(str(tiny_teacher), tiny_curated, out, resolution=32, batch_size=4, dtype="float32", device="cpu")
    return out


def tiny_params(teacher: Path, method: dict | None = None, **trainer):
    """DistillParams for a seconds-long CPU run (default: cfg_aware 4 -> 2 steps) on the tiny teacher."""
    from sd_distill.distill.config import DistillParams

    t = dict(max_steps=6, batch_size=2, checkpoint_every=2, log_every=1, device="cpu", lr=1e-4)
    t.update(trainer)
    return DistillParams.model_validate({
        "teacher": str(teacher),
        "method": method or {"kind": "cfg_aware", "teacher_steps": 4, "student_steps": 2},
        "trainer": t,
        "data": {"resolution": 32, "cache_dtype": "float32", "cache_batch_size": 4},
    })


def poison_loss(monkeypatch, bad_calls, factor: float = float("nan")) -> None:
    """Multiply the method's loss by ``factor`` (NaN: a non-finite loss; 1e6: an exploding one) on the given
    (1-based) loss calls: a fault injected into the real method."""
    import sd_distill.distill.methods as methods

    real = methods.build_method

    def build(*args):
        m = real(*args)
        inner, count = m.loss, {"n": 0}

        def loss(batch, generator):
            count["n"] += 1
            value, logs = inner(batch, generator)
            return (value * factor if count["n"] in bad_calls else value), logs

        m.loss = loss
        return m

    monkeypatch.setattr(methods, "build_method", build)
