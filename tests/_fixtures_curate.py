"""Fixture files in the real source formats, generated images (good and broken) and a loopback server.

Used by tests/test_curate_*.py and benchmarks/bench_curate.py. Everything is generated; nothing is
downloaded. The loopback server is the toy world's ``serve_folder`` with its ``/_fault/`` paths.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def color_image(seed: int, size: int = 24, mode: str = "RGB") -> Image.Image:
    """A deterministic two-color image (distinct per seed) in the given PIL mode."""
    rng = np.random.default_rng(seed)
    a = np.zeros((size, size, 3), np.uint8)
    a[:] = rng.integers(0, 256, 3)
    a[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = rng.integers(0, 256, 3)
    img = Image.fromarray(a)
    return img if mode == "RGB" else img.convert(mode)


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def odd_images() -> dict[str, bytes]:
    """Encoded images of the awkward kinds real crawls contain, keyed by file name."""
    base = color_image(7, 24)
    out = {}
    buf = io.BytesIO()
    base.convert("CMYK").save(buf, format="JPEG", quality=95)
    out["cmyk.jpg"] = buf.getvalue()
    gray16 = (np.asarray(base.convert("L"), np.uint16) * 257).astype(np.uint16)
    out["gray16.png"] = png_bytes(Image.fromarray(gray16))
    out["palette.png"] = png_bytes(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    frames = [color_image(s, 24) for s in (11, 12, 13)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out["animated.gif"] = buf.getvalue()
    out["rgba.png"] = png_bytes(color_image(8, 24).convert("RGBA"))
    out["gray.png"] = png_bytes(color_image(9, 24).convert("L"))
    return out


def bomb_png(side: int = 3000) -> bytes:
    """A PNG whose pixel count (side^2) far exceeds its byte size: a small decompression bomb."""
    return png_bytes(Image.new("L", (side, side), 0), optimize=True)


def write_image_folder(folder: Path, n: int, start: int = 0, size: int = 24) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + n):
        name = f"img{i:03d}.png"
        (folder / name).write_bytes(png_bytes(color_image(i, size)))
        names.append(name)
    return names


# -- source files in the published formats ------------------------------------------------------
def write_laion_parquet(path: Path, urls: list[str], captions: list) -> Path:
    n = len(urls)
    df = pd.DataFrame(
        {
            "URL": urls,
            "TEXT": captions,
            "WIDTH": [512] * n,
            "HEIGHT": [384] * n,
            "similarity": np.linspace(0.3, 0.4, n),
            "LANGUAGE": ["en"] * n,
            "hash": np.arange(n, dtype=np.int64),
            "pwatermark": np.linspace(0.0, 0.5, n),
            "punsafe": np.linspace(0.0, 0.1, n),
            "aesthetic": np.linspace(7.0, 8.0, n),
        }
    )
    df.to_parquet(path, index=False)
    return path


def write_coco_json(path: Path, file_names: list[str], captions_per_image: list[list[str]], url_base: str | None) -> Path:
    images, annotations, ann_id = [], [], 1000
    for i, (name, caps) in enumerate(zip(file_names, captions_per_image)):
        im = {"license": 1, "file_name": name, "height": 24, "width": 24, "date_captured": "2013-11-14 16:28:13", "id": i + 1}
        if url_base:
            im["coco_url"] = f"{url_base}/{name}"
            im["flickr_url"] = f"http://farm.example/{name}"
        images.append(im)
        for c in caps:
            annotations.append({"image_id": i + 1, "id": ann_id, "caption": c})
            ann_id += 1
    path.write_text(json.dumps({"info": {"year": 2017}, "licenses": [], "images": images, "annotations": annotations}))
    return path


def write_diffusiondb(folder: Path, n: int, part_id: int = 1, start: int = 0) -> Path:
    """metadata.parquet + images/part-XXXXXX.zip holding PNGs and the part's JSON, as the dataset ships."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = [f"{i:08x}-aaaa-bbbb-cccc-{i:012d}.png" for i in range(start, start + n)]
    prompts = [f"a painting of object {i}, trending on artstation" for i in range(start, start + n)]
    part = f"part-{part_id:06d}"
    with zipfile.ZipFile(folder / "images" / f"{part}.zip", "w") as z:
        for i, name in enumerate(names):
            z.writestr(name, png_bytes(color_image(500 + start + i)))
        z.writestr(f"{part}.json", json.dumps({nm: {"p": p, "se": 1, "c": 7.0, "st": 50, "sa": "k_lms"} for nm, p in zip(names, prompts)}))
    df = pd.DataFrame(
        {
            "image_name": names,
            "prompt": prompts,
            "part_id": np.full(n, part_id, np.uint16),
            "seed": np.arange(n, dtype=np.uint32),
            "step": np.full(n, 50, np.uint16),
            "cfg": np.full(n, 7.0, np.float32),
            "sampler": np.full(n, 8, np.uint8),
            "width": np.full(n, 512, np.uint16),
            "height": np.full(n, 512, np.uint16),
            "user_name": ["u"] * n,
            "timestamp": pd.to_datetime(["2022-08-01"] * n, utc=True),
            "image_nsfw": np.zeros(n, np.float32),
            "prompt_nsfw": np.zeros(n, np.float32),
        }
    )
    df.to_parquet(folder / "metadata.parquet", index=False)
    return folder / "metadata.parquet"


def write_hpdv2(folder: Path, n_entries: int, split: str = "train") -> Path:
    """train.json / test.json with two images per prompt in ``folder/<split>/``."""
    names = write_image_folder(folder / split, 2 * n_entries, start=800)
    entries = []
    for i in range(n_entries):
        files = names[2 * i : 2 * i + 2]
        if split == "train":
            entries.append({"human_preference": [0, 1] if i % 2 else [1, 0], "prompt": f"hpd prompt {i}", "file_path": files, "user_hash": "abc"})
        else:
            entries.append({"prompt": f"hpd prompt {i}", "image_path": files, "rank": [2, 1], "raw_annotations": [{"rank": [2, 1], "user_hash": "x"}]})
    path = folder / f"{split}.json"
    path.write_text(json.dumps(entries))
    return path


def img2dataset_json(key: str, url: str, caption: str, size: int = 24, **extra) -> dict:
    """The ``<key>.json`` img2dataset writes next to each image of a webdataset shard."""
    return {"url": url, "caption": caption, "key": key, "status": "success", "error_message": None, "width": size,
            "height": size, "original_width": 2 * size, "original_height": 2 * size, "exif": "{}", "sha256": None, **extra}


def write_webdataset_shard(path: Path, samples: list[tuple[str, dict]]) -> Path:
    """A tar shard in img2dataset's webdataset layout: each sample's members ``<key>.<ext>`` in the given order.

    ``samples``: (key, {ext: bytes | str | dict}); str is written as UTF-8, dict as JSON.
    """
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, value in members.items():
                data = json.dumps(value).encode() if isinstance(value, dict) else value.encode() if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def webdataset_sample(i: int, caption: str | None = None, ext: str = "png", size: int = 24) -> tuple[str, dict]:
    """Sample ``i`` of a shard: a distinct image, its caption and img2dataset's json (url ``http://img.example/<i>.<ext>``)."""
    key = f"{i:09d}"
    caption = f"a picture number {i}" if caption is None else caption
    buf = io.BytesIO()
    color_image(300 + i, size).save(buf, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[ext])
    return key, {ext: buf.getvalue(), "txt": caption,
                 "json": img2dataset_json(key, f"http://img.example/{i}.{ext}", caption, size, similarity=0.3 + i / 100)}


# -- step inputs without img2dataset ------------------------------------------------------------
class BrightnessScorer:
    """A stand-in HPS scorer: score = mean pixel value / 255 + 0.5 if the prompt says "bright".

    Lets filter tests know every score in advance; ``calls`` records batch sizes.
    """

    version = "v2.1"

    def __init__(self):
        self.calls: list[int] = []

    def score(self, images, prompts, batch_size=32):
        assert len(images) == len(prompts)
        self.calls.append(len(images))
        return np.array(
            [np.asarray(im, np.float32).mean() / 255 + (0.5 if "bright" in p else 0.0) for im, p in zip(images, prompts)],
            dtype=np.float32,
        )


class ListCaptioner:
    """A stand-in captioner handing out fixed captions in order across calls; ``calls`` records call sizes."""

    def __init__(self, captions: list[str]):
        self.captions = list(captions)
        self.calls: list[int] = []

    def caption(self, images, batch_size=16):
        done = sum(self.calls)
        self.calls.append(len(images))
        assert done + len(images) <= len(self.captions), "more images than prepared captions"
        return self.captions[done : done + len(images)]


def gray_png(level: int, size: int = 8) -> bytes:
    return png_bytes(Image.new("RGB", (size, size), (level, level, level)))


def write_downloaded(folder: Path, rows: list[tuple[str, str, int, str]]) -> Path:
    """A downloaded.parquet of (key, source, gray level, caption) rows, as the download step writes it."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    images = [gray_png(level) for _, _, level, _ in rows]
    df = pd.DataFrame(
        {
            "key": [r[0] for r in rows],
            "source": [r[1] for r in rows],
            "url": [f"http://h/{r[0]}.png" for r in rows],
            "local_path": [None] * len(rows),
            "caption_original": [r[3] for r in rows],
            "extra": ["{}"] * len(rows),
            "image": images,
            "width": [8] * len(rows),
            "height": [8] * len(rows),
            "sha256": [hashlib.sha256(b).hexdigest() for b in images],
        }
    )
    df.to_parquet(folder / "downloaded.parquet", index=False)
    return folder
