"""The download step for real: img2dataset against a loopback server with broken images, local files, resume."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from PIL import Image, UnidentifiedImageError

from sd_distill.curate.collect import collect_sources
from sd_distill.curate.config import CurateParams, DownloadParams, SourceSpec
from sd_distill.curate.download import DOWNLOADED_FILE, download_images, rgb_image_bytes
from sd_distill.curate.schema import read_rejects
from tests._fixtures_curate import (
    bomb_png,
    color_image,
    odd_images,
    png_bytes,
    write_coco_json,
    write_diffusiondb,
    write_image_folder,
)


def _served(path: str) -> str:
    return f"served://{path}"


@pytest.mark.slow  # two img2dataset runs start ~3 interpreters each (20-50 s on 2 busy cores)
def test_download_handles_every_kind_of_bad_input_and_loses_nothing(tmp_path):
    collect_dir = tmp_path / "collect"
    web = collect_dir / "web"  # served from the collect folder as served://web/...
    write_image_folder(web, 3)
    for name, data in odd_images().items():
        (web / name).write_bytes(data)
    (web / "bomb.png").write_bytes(bomb_png(2000))
    (web / "copy_of_img000.png").write_bytes((web / "img000.png").read_bytes())
    rows = [(f"web/img00{i}.png", f"good {i}") for i in range(3)]
    rows += [(f"web/{n}", f"odd {n}") for n in odd_images()]
    rows += [
        ("web/copy_of_img000.png", "same pixels, other url"),
        ("web/bomb.png", "a bomb"),
        ("_fault/404/web/img000.png", "dead link"),
        ("_fault/html/web/img001.png", "redirects to a web page"),
        ("_fault/truncated/web/img002.png", "half a png"),
        ("_fault/slow/4/web/img001.png", "too slow"),
    ]
    urls = pd.DataFrame({"url": [_served(u) for u, _ in rows], "caption": [c for _, c in rows]})
    (tmp_path / "list.csv").write_text(urls.to_csv(index=False))
    # local images: a COCO folder (one file missing) and a DiffusionDB part zip
    names = write_image_folder(tmp_path / "coco" / "train2017", 2, start=20) + ["gone.png"]
    coco = write_coco_json(tmp_path / "coco" / "captions.json", names, [["coco a"], ["coco b"], ["coco gone"]], None)
    write_diffusiondb(tmp_path / "ddb", 2)
    params = CurateParams(
        sources=[
            SourceSpec(kind="url_list", path=str(tmp_path / "list.csv"), name="web", served=True),
            SourceSpec(kind="coco_json", path=str(coco), images_root=str(tmp_path / "coco" / "train2017"), name="coco"),
            SourceSpec(kind="diffusiondb", path=str(tmp_path / "ddb"), name="ddb"),
        ],
        download=DownloadParams(image_size=16, timeout=1.5, retries=0, threads=4, max_image_pixels=1_000_000),
    )
    collect_sources(params, collect_dir)
    events = []
    counts = download_images(params, collect_dir, tmp_path / "dl", progress=lambda d, t, m: events.append((d, t)))

    kept = pd.read_parquet(tmp_path / "dl" / DOWNLOADED_FILE)
    rejects = read_rejects(tmp_path / "dl").set_index("caption_original")
    n_in = len(rows) + 3 + 2
    assert counts["in"] == n_in == len(kept) + len(rejects)
    assert events[-1] == (n_in, n_in)
    # every stored image is 16x16 8-bit RGB whatever it was: CMYK, 16-bit, palette, animated, alpha, gray
    assert set(kept["caption_original"]) == {"good 0", "good 1", "good 2", "coco a", "coco b", *(f"odd {n}" for n in odd_images()),
                                              "a painting of object 0, trending on artstation", "a painting of object 1, trending on artstation"}
    for data, w, h in zip(kept["image"], kept["width"], kept["height"]):
        im = Image.open(io.BytesIO(data))
        assert (im.mode, im.size, w, h) == ("RGB", (16, 16), 16, 16)
    converted = {c: json.loads(e).get("image_conversion") for c, e in zip(kept["caption_original"], kept["extra"])}
    assert converted["odd gray16.png"] == "converted I;16 to RGB" and converted["odd gray.png"] == "converted L to RGB"
    # the 16-bit gray image keeps its brightness (scaled to 8 bits, not clipped to white)
    g16 = Image.open(io.BytesIO(kept.set_index("caption_original").loc["odd gray16.png", "image"]))
    g8 = Image.open(io.BytesIO(kept.set_index("caption_original").loc["odd gray.png", "image"]))
    assert 0 < sum(g16.convert("L").getdata()) / 256 < 255
    assert g8.size == g16.size
    # rejects carry a code in `reason` and img2dataset's own words in `detail`
    codes = rejects["reason"].to_dict()
    assert codes["dead link"] == "http_4xx" and "404" in rejects.loc["dead link", "detail"]
    # refused by OpenCV's pixel limit before any pixel is decoded (OPENCV_IO_MAX_IMAGE_PIXELS)
    assert codes["a bomb"] == "too_large" and "CV_IO_MAX_IMAGE_PIXELS" in rejects.loc["a bomb", "detail"]
    assert codes["half a png"] == "not_an_image" and codes["redirects to a web page"] == "not_an_image"
    assert "decod" in rejects.loc["redirects to a web page", "detail"].lower()
    assert codes["too slow"] == "timeout" and "timed out" in rejects.loc["too slow", "detail"].lower()
    assert codes["same pixels, other url"] == "duplicate_image"
    assert rejects.loc["same pixels, other url", "detail"] == kept.set_index("caption_original").loc["good 0", "key"]
    assert codes["coco gone"] == "local_unreadable" and "gone.png" in rejects.loc["coco gone", "detail"]
    assert set(rejects["stage"]) == {"download"}
    assert kept["sha256"].is_unique and counts["per_source"]["ddb"] == {"in": 2, "downloaded": 2, "rejected": 0}


@pytest.mark.slow
def test_download_resumes_an_interrupted_run_without_refetching_finished_shards(tmp_path):
    collect_dir = tmp_path / "collect"
    names = write_image_folder(collect_dir / "web", 6)
    urls = pd.DataFrame({"url": [_served(f"web/{n}") for n in names], "caption": [f"c{i}" for i in range(6)]})
    (tmp_path / "list.csv").write_text(urls.to_csv(index=False))
    resume = tmp_path / "resume"
    params = CurateParams(
        sources=[SourceSpec(kind="url_list", path=str(tmp_path / "list.csv"), served=True)],
        download=DownloadParams(image_size=16, shard_size=2, threads=2, resume_dir=str(resume)),
    )
    collect_sources(params, collect_dir)
    download_images(params, collect_dir, tmp_path / "first")
    shards = sorted(resume.glob("*/shards"))[0]
    assert len(list(shards.glob("*_stats.json"))) == 3
    # "interrupt": shard 2 never finished; the images of shards 0 and 1 have since vanished from the web
    for f in shards.glob("00002*"):
        f.unlink()
    for n in names[:4]:
        (collect_dir / "web" / n).unlink()
    counts = download_images(params, collect_dir, tmp_path / "second")
    assert counts["downloaded"] == 6  # shards 0-1 came from the resumed run, only shard 2 was fetched again
    first = pd.read_parquet(tmp_path / "first" / DOWNLOADED_FILE)
    second = pd.read_parquet(tmp_path / "second" / DOWNLOADED_FILE)
    assert first["sha256"].tolist() == second["sha256"].tolist()


def test_rgb_image_bytes_leaves_rgb_untouched_and_converts_palette():
    rgb = png_bytes(color_image(1))
    assert rgb_image_bytes(rgb, "png", 1)[0] == rgb
    data, w, h, note = rgb_image_bytes(png_bytes(color_image(2).convert("P")), "png", 1)
    assert Image.open(io.BytesIO(data)).mode == "RGB" and (w, h) == (24, 24) and note == "converted P to RGB"
    with pytest.raises(UnidentifiedImageError):
        rgb_image_bytes(b"not an image", "png", 1)
