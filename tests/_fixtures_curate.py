"""Fixture files in the real source formats, generated images (good and broken) and a loopback server.

Used by tests/test_curate_*.py and benchmarks/bench_curate.py. Everything is generated; nothing is
downloaded. The server answers special paths with faults: ``/missing`` (404), ``/slow/...`` (sleeps
past any test timeout), ``/redirect-html`` (302 to an HTML page), ``/truncated.png`` (half a PNG).
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

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


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/missing":
            self.send_error(404, "File not found")
        elif path.startswith("/slow/"):
            time.sleep(3.0)
            self.send_error(504)
        elif path == "/redirect-html":
            self.send_response(302)
            self.send_header("Location", "/page.html")
            self.end_headers()
        elif path == "/page.html":
            body = b"<html><body>not an image</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/truncated.png":
            body = png_bytes(color_image(99, 64))
            body = body[: len(body) // 2]
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()


@contextmanager
def loopback_server(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 (port chosen by the OS) with the fault paths above; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


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
