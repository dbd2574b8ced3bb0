"""Write the toy world in every real source format the curate stage reads, plus a held-out evaluation set.

``make_toy_sources(out_dir, ...)`` writes ``out_dir/images/<key>.png`` (served over HTTP by
:func:`sd_distill.toy.server.serve_folder`) and splits the samples, in turn, over five formats:

============  ====================================================================================
name          file (relative to ``out_dir``) and layout
============  ====================================================================================
laion         ``laion/laion.parquet``: URL, TEXT, WIDTH, HEIGHT, similarity, punsafe, pwatermark, aesthetic
coco          ``coco/annotations/captions_train2017.json``: ``images`` (id, file_name, coco_url, width,
              height), ``annotations`` (image_id, id, caption; clean images get two captions);
              ``file_name`` is relative to ``coco_images`` = ``images/``
diffusiondb   ``diffusiondb/metadata.parquet`` (image_name, prompt, part_id, seed, step, cfg, sampler,
              width, height, user_name, timestamp, image_nsfw, prompt_nsfw) and
              ``diffusiondb/images/part-000001.zip`` holding the PNGs and ``part-000001.json``
              ({image_name: {p, se, c, st, sa}}; also written next to the zip)
hpdv2_train   ``hpdv2/train.json``: [{prompt, file_path: [own, rival], human_preference: [1, 0], user_hash}]
hpdv2_test    ``hpdv2/test.json``: [{prompt, image_path: [own, rival], rank: [1, 2], raw_annotations}]
              (paths relative to ``hpdv2/``; each sample is the preferred image of exactly one prompt,
              its rival is the next sample of the same split)
urls          ``urls.csv``: url, caption
truth         ``truth.parquet``: key, n_objects, color1, shape1, relation, color2, shape2, background,
              caption (published), true_caption, is_bad, bad_kind, caption_kind, source, image_path
============  ====================================================================================

URLs are ``{base_url}/images/<key>.png``; each sample appears in exactly one source.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from sd_distill.toy.world import (
    WEB_BAD_FRACTION,
    WEB_WEAK_FRACTION,
    Sample,
    caption_for,
    make_samples,
    paraphrase_for,
    render_scene,
    scene_truth,
)

SOURCE_FORMATS: tuple[str, ...] = ("laion", "coco", "diffusiondb", "hpdv2", "urls")
HPS_STYLES: tuple[str, ...] = ("anime", "concept-art", "paintings", "photo")


def _url(base_url: str, key: str) -> str:
    return f"{base_url.rstrip('/')}/images/{key}.png"


def _write_laion(samples: list[Sample], folder: Path, base_url: str, rng: np.random.Generator) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        matching = not (s.is_bad and s.bad_kind in ("wrong_caption", "boilerplate"))
        rows.append(
            {
                "URL": _url(base_url, s.key),
                "TEXT": s.caption,
                "WIDTH": s.image.width,
                "HEIGHT": s.image.height,
                # CLIP similarity as LAION publishes it: matching pairs score higher (a weak, noisy signal)
                "similarity": float(rng.uniform(0.28, 0.40) if matching else rng.uniform(0.18, 0.32)),
                "punsafe": float(rng.uniform(0.0, 0.05)),
                "pwatermark": float(rng.uniform(0.0, 0.3)),
                "aesthetic": float(rng.uniform(5.0, 7.0) if not s.is_bad else rng.uniform(3.5, 6.0)),
            }
        )
    path = folder / "laion.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def _write_coco(samples: list[Sample], folder: Path, base_url: str, start_id: int, split: str = "train2017") -> Path:
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, s in enumerate(samples):
        image_id = start_id + i
        images.append(
            {
                "license": 1,
                "file_name": f"{s.key}.png",
                "coco_url": _url(base_url, s.key),
                "height": s.image.height,
                "width": s.image.width,
                "date_captured": "2013-11-14 11:18:45",
                "flickr_url": _url(base_url, s.key),
                "id": image_id,
            }
        )
        for caption in [s.caption, *s.extra_captions]:
            annotations.append({"image_id": image_id, "id": len(annotations) + 1, "caption": caption})
    doc = {
        "info": {"description": "toy world in COCO 2017 captions layout", "version": "1.0", "year": 2017},
        "licenses": [{"url": "about:blank", "id": 1, "name": "toy"}],
        "images": images,
        "annotations": annotations,
    }
    path = folder / "annotations" / f"captions_{split}.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_diffusiondb(samples: list[Sample], folder: Path, rng: np.random.Generator) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    part = "part-000001"
    rows, part_json = [], {}
    samplers = ("k_lms", "k_euler", "k_euler_ancestral", "ddim", "plms")
    for s in samples:
        name = f"{s.key}.png"
        meta = {
            "p": s.caption,
            "se": int(rng.integers(0, 2**32 - 1)),
            "c": float(rng.choice([7.0, 7.5, 9.0])),
            "st": int(rng.choice([20, 30, 50])),
            "sa": str(rng.choice(samplers)),
        }
        part_json[name] = meta
        rows.append(
            {
                "image_name": name,
                "prompt": s.caption,
                "part_id": 1,
                "seed": meta["se"],
                "step": meta["st"],
                "cfg": meta["c"],
                "sampler": meta["sa"],
                "width": s.image.width,
                "height": s.image.height,
                "user_name": hashlib.sha256(f"user{int(rng.integers(20))}".encode()).hexdigest(),
                "timestamp": pd.Timestamp("2022-08-20", tz="UTC") + pd.Timedelta(seconds=int(rng.integers(0, 86400 * 30))),
                "image_nsfw": float(rng.uniform(0, 0.1)),
                "prompt_nsfw": float(rng.uniform(0, 0.05)),
            }
        )
    with zipfile.ZipFile(folder / "images" / f"{part}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for s in samples:
            zf.writestr(f"{s.key}.png", _png_bytes(s.image))
        zf.writestr(f"{part}.json", json.dumps(part_json))
    (folder / "images" / f"{part}.json").write_text(json.dumps(part_json))
    df = pd.DataFrame(rows)
    df = df.astype({"part_id": "uint16", "seed": "uint32", "step": "uint16", "cfg": "float32", "width": "uint16", "height": "uint16",
                    "image_nsfw": "float32", "prompt_nsfw": "float32"})
    path = folder / "metadata.parquet"
    df.to_parquet(path, index=False)
    return path


def _write_hpdv2(samples: list[Sample], folder: Path) -> tuple[Path, Path]:
    half = (len(samples) + 1) // 2
    paths = []
    for split, part in (("train", samples[:half]), ("test", samples[half:])):
        (folder / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for i, s in enumerate(part):
            (folder / split / f"{s.key}.png").write_bytes(_png_bytes(s.image))
            own = f"{split}/{s.key}.png"
            rival = f"{split}/{part[(i + 1) % len(part)].key}.png" if len(part) > 1 else own
            user = hashlib.sha256(f"{split}{i}".encode()).hexdigest()[:16]
            if split == "train":
                entries.append({"human_preference": [1, 0], "prompt": s.caption, "file_path": [own, rival], "user_hash": user})
            else:
                entries.append(
                    {
                        "prompt": s.caption,
                        "image_path": [own, rival],
                        "rank": [1, 2],
                        "raw_annotations": [{"rank": [1, 2], "user_hash": user}],
                    }
                )
        path = folder / f"{split}.json"
        path.write_text(json.dumps(entries, indent=1))
        paths.append(path)
    return paths[0], paths[1]


def make_toy_sources(
    out_dir: str | Path,
    n: int = 200,
    seed: int = 0,
    bad_fraction: float = WEB_BAD_FRACTION,
    base_url: str = "served://toy",
    image_size: int = 32,
    weak_fraction: float = WEB_WEAK_FRACTION,
) -> dict[str, Path]:
    """Generate ``n`` toy samples and write them as every source format; return the paths by format name.

    ``bad_fraction`` of the pairs are planted bad (``is_bad``); ``weak_fraction`` of the good ones get a weak
    caption (``caption_kind`` partial / vague / decorated): good pairs that recaptioning should improve.

    Keys: ``images`` (folder), ``laion``, ``coco``, ``coco_images``, ``diffusiondb``, ``diffusiondb_zip``,
    ``hpdv2_train``, ``hpdv2_test``, ``urls``, ``truth``. Sample ``i`` goes to source ``i % 5``.
    """
    if not 32 <= image_size <= 64:
        raise ValueError(f"image_size must be in [32, 64], got {image_size}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples = make_samples(n, seed=seed, bad_fraction=bad_fraction, image_size=image_size, weak_fraction=weak_fraction)
    rng = np.random.default_rng(seed + 1)
    for s in samples:
        s.image.save(out / "images" / f"{s.key}.png")
    by_source: dict[str, list[Sample]] = {name: [] for name in SOURCE_FORMATS}
    source_of = {}
    for i, s in enumerate(samples):
        name = SOURCE_FORMATS[i % len(SOURCE_FORMATS)]
        by_source[name].append(s)
        source_of[s.key] = name

    paths: dict[str, Path] = {"images": out / "images", "coco_images": out / "images"}
    paths["laion"] = _write_laion(by_source["laion"], out / "laion", base_url, rng)
    paths["coco"] = _write_coco(by_source["coco"], out / "coco", base_url, start_id=1)
    paths["diffusiondb"] = _write_diffusiondb(by_source["diffusiondb"], out / "diffusiondb", rng)
    paths["diffusiondb_zip"] = out / "diffusiondb" / "images" / "part-000001.zip"
    if by_source["hpdv2"]:
        paths["hpdv2_train"], paths["hpdv2_test"] = _write_hpdv2(by_source["hpdv2"], out / "hpdv2")
    urls = pd.DataFrame({"url": [_url(base_url, s.key) for s in by_source["urls"]], "caption": [s.caption for s in by_source["urls"]]})
    paths["urls"] = out / "urls.csv"
    urls.to_csv(paths["urls"], index=False)

    truth = pd.DataFrame([{**s.truth_row(), "source": source_of[s.key], "image_path": f"images/{s.key}.png"} for s in samples])
    truth["n_objects"] = truth["n_objects"].astype("int64")
    paths["truth"] = out / "truth.parquet"
    truth.to_parquet(paths["truth"], index=False)
    return paths


def make_eval_prompts(out_dir: str | Path, n: int = 40, seed: int = 1000, image_size: int = 32, per_style: int = 10) -> dict[str, Path]:
    """Held-out prompts with reference images: COCO ``captions_val2017.json`` + ``val2017/`` and HPSv2 benchmark JSONs.

    Writes ``coco/annotations/captions_val2017.json`` (two captions per image), ``coco/val2017/<id:012d>.png``,
    ``hps_benchmark/{anime,concept-art,paintings,photo}.json`` (each a JSON list of up to ``per_style`` distinct
    prompts; the "styles" are toy palettes: single objects (18 exist), vertical pairs, horizontal pairs, a mix)
    and ``eval_truth.parquet``.
    Scenes come from a separate random stream (``seed`` differs from the training data's).
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    val_dir = out / "coco" / "val2017"
    val_dir.mkdir(parents=True, exist_ok=True)
    (out / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations, truth_rows = [], [], []
    for i in range(n):
        truth = scene_truth(rng)
        img = render_scene(truth, image_size, rng)
        image_id = 100000 + i
        file_name = f"{image_id:012d}.png"
        img.save(val_dir / file_name)
        images.append({"license": 1, "file_name": file_name, "coco_url": f"served://toy/val2017/{file_name}",
                       "height": image_size, "width": image_size, "id": image_id})
        for caption in (caption_for(truth), paraphrase_for(truth)):
            annotations.append({"image_id": image_id, "id": len(annotations) + 1, "caption": caption})
        truth_rows.append({"image_id": image_id, "file_name": file_name, **truth, "true_caption": caption_for(truth)})
    caption_path = out / "coco" / "annotations" / "captions_val2017.json"
    caption_path.write_text(json.dumps({"info": {"description": "toy world held-out prompts"}, "licenses": [],
                                         "images": images, "annotations": annotations}, indent=1))
    pd.DataFrame(truth_rows).to_parquet(out / "eval_truth.parquet", index=False)

    # HPSv2 benchmark layout: one JSON list of prompts per style
    bench = out / "hps_benchmark"
    bench.mkdir(parents=True, exist_ok=True)
    wanted = {
        "anime": lambda t: t["n_objects"] == 1,
        "concept-art": lambda t: t["relation"] in ("above", "below"),
        "paintings": lambda t: t["relation"] in ("left of", "right of"),
        "photo": lambda t: True,
    }
    paths: dict[str, Path] = {"coco_captions": caption_path, "coco_images": val_dir, "truth": out / "eval_truth.parquet"}
    for style in HPS_STYLES:
        # distinct prompts, up to per_style: a style may have fewer (18 single-object captions exist), so
        # the search stops once 5,000 draws in a row bring nothing new
        prompts: list[str] = []
        misses = 0
        while len(prompts) < per_style and misses < 5000:
            t = scene_truth(rng)
            if wanted[style](t) and caption_for(t) not in prompts:
                prompts.append(caption_for(t))
                misses = 0
            else:
                misses += 1
        paths[style] = bench / f"{style}.json"
        paths[style].write_text(json.dumps(prompts, indent=1))
    return paths
