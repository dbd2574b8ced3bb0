"""Source adapters: each published dataset format -> one table of (url | local_path, raw caption, extras).

Every adapter returns a DataFrame with exactly ``SOURCE_COLUMNS``:

- ``url``: the image URL as the file gives it, or None (``collect`` accepts only http/https, and
  ``served://`` for sources marked ``served``: ``netguard.url_problem``);
- ``local_path``: the image as a local path or fsspec URL (``zip://<member>::<archive>``), or None;
- ``caption_raw``: the caption as found (str, bytes or None: validated later by ``collect``);
- ``extra``: the row's other fields as a JSON object string;
- ``problem``: why the row names no image it may read, or None: a file name from the source file that is
  absolute or climbs out of a local ``images_root`` with ``..`` (``collect`` rejects it, ``path_outside_root``);
- ``problem_reason``: the ``reasons.REASONS`` code ``collect`` rejects a row with a ``problem`` under (None means
  ``path_outside_root``; the WebDataset reader sets ``image_missing``, ``caption_missing``, ``tar_damaged``).

Formats (field names as the datasets publish them):

- LAION-art parquet: ``URL``, ``TEXT`` (+ WIDTH, HEIGHT, similarity, aesthetic, punsafe, pwatermark, ...).
- MSCOCO-2017 captions JSON: ``images`` [{id, file_name, coco_url, width, height}], ``annotations``
  [{image_id, id, caption}].
- DiffusionDB ``metadata.parquet``: image_name, prompt, part_id (+ seed, step, cfg, sampler, ...); images in
  ``part-<part_id:06d>.zip`` (or an extracted ``part-<part_id:06d>/`` folder) beside it or under ``images/``.
- HPDv2 (HPSv2 repository README): ``train.json`` [{prompt, file_path: [..], human_preference: [..]}],
  ``test.json`` [{prompt, image_path: [..], rank: [..]}]; images in ``train/`` / ``test/`` beside the JSON.
- URL list: csv / tsv / parquet / jsonl with configurable url and caption columns (img2dataset's inputs).
- WebDataset tar shards (img2dataset's ``webdataset`` output): ``<key>.jpg|png|webp`` + ``<key>.txt`` (+ ``<key>.json``),
  a folder, brace pattern or fsspec URL (``wds.py``); the images are read from the shards, not fetched.

A malformed file raises ``SourceFormatError`` naming the file and the problem; nothing is downloaded
before every source has parsed.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Callable

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from sd_distill.curate.config import SourceSpec
from sd_distill.curate.netguard import url_problem
from sd_distill.curate.wds import ShardError, read_webdataset_rows

SOURCE_COLUMNS = ["url", "local_path", "caption_raw", "extra", "problem", "problem_reason"]


class SourceFormatError(ValueError):
    """A source file that cannot be read as its declared format (names the file and the problem)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


# -- file access ----------------------------------------------------------------------------------
def _exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def _isdir(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.isdir(p)


def _join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts) if "://" in base else str(posixpath.join(base, *parts))


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."


def _read_bytes(path: str) -> bytes:
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise SourceFormatError(path, "file not found") from None
    except IsADirectoryError:
        raise SourceFormatError(path, "is a folder, expected a file") from None


def _read_json(path: str) -> object:
    # surrogateescape keeps non-UTF-8 bytes inside strings so one bad caption rejects one row, not the file
    text = _read_bytes(path).decode("utf-8", errors="surrogateescape")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceFormatError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _read_parquet(path: str) -> pd.DataFrame:
    try:
        table = pq.read_table(io.BytesIO(_read_bytes(path)))
    except SourceFormatError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet bytes
        raise SourceFormatError(path, f"not a readable Parquet file ({e})") from None
    return table.to_pandas()


def _require(path: str, columns, required: list[str], what: str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise SourceFormatError(
            path, f"missing columns {missing} required for {what} (found {sorted(map(str, columns))})"
        )


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return None if np.isnan(v) else float(v)
    if isinstance(v, float) and np.isnan(v):
        return None
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    return v


def _extras(df: pd.DataFrame, skip: list[str]) -> list[str]:
    cols = [c for c in df.columns if c not in skip]
    records = df[cols].to_dict(orient="records") if cols else [{}] * len(df)
    return [json.dumps({str(k): _jsonable(v) for k, v in r.items()}, default=str, ensure_ascii=False) for r in records]


def _table(url, local_path, caption_raw, extra, problem=None, problem_reason=None) -> pd.DataFrame:
    n = len(caption_raw)
    return pd.DataFrame(
        {
            "url": list(url) if url is not None else [None] * n,
            "local_path": list(local_path) if local_path is not None else [None] * n,
            "caption_raw": list(caption_raw),
            "extra": list(extra),
            "problem": list(problem) if problem is not None else [None] * n,
            "problem_reason": list(problem_reason) if problem_reason is not None else [None] * n,
        },
        columns=SOURCE_COLUMNS,
    )


def _is_url_base(root: str) -> bool:
    return root.startswith(("http://", "https://", "served://"))


def _outside(relpath: str) -> str | None:
    """Why ``relpath`` (a file name from a source file) would leave its folder, or None."""
    rel = str(relpath).replace("\\", "/")
    if rel.startswith("/") or "://" in rel or (len(rel) > 1 and rel[1] == ":") or ".." in rel.split("/"):
        return f"{str(relpath)[:120]!r} is absolute or leaves the image folder"
    return None


def _locate(root: str, relpath: str) -> tuple[str | None, str | None, str | None]:
    """(url, local_path, problem) of an image stored at ``root/relpath``; a local path must stay inside root."""
    if _is_url_base(root):
        return root.rstrip("/") + "/" + relpath.lstrip("/"), None, None
    problem = _outside(relpath)
    return None, (None if problem else _join(root, relpath)), problem


# -- adapters -------------------------------------------------------------------------------------
def read_laion_parquet(spec: SourceSpec) -> pd.DataFrame:
    """LAION(-art) metadata parquet: URL and TEXT required, every other column kept as an extra."""
    paths = _expand(spec.path, ".parquet")
    frames = []
    for path in paths:
        df = _read_parquet(path)
        _require(path, df.columns, ["URL", "TEXT"], "a LAION parquet")
        frames.append(_table(df["URL"], None, df["TEXT"], _extras(df, ["URL", "TEXT"])))
    return pd.concat(frames, ignore_index=True)


def read_url_list(spec: SourceSpec) -> pd.DataFrame:
    """Any csv / tsv / parquet / jsonl list with ``spec.url_col`` and ``spec.caption_col``."""
    frames = []
    for path in _expand(spec.path, None):
        fmt = spec.format or _format_from_name(path)
        df = _read_table(path, fmt)
        _require(path, df.columns, [spec.url_col, spec.caption_col], "a URL list (url_col, caption_col)")
        urls = [None if (u is None or (isinstance(u, float) and np.isnan(u))) else str(u) for u in df[spec.url_col]]
        frames.append(_table(urls, None, df[spec.caption_col], _extras(df, [spec.url_col, spec.caption_col])))
    return pd.concat(frames, ignore_index=True)


def read_coco_json(spec: SourceSpec) -> pd.DataFrame:
    """MSCOCO-2017 captions JSON; images by coco_url or from ``images_root``/file_name."""
    path = spec.path
    data = _read_json(path)
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise SourceFormatError(path, f"a COCO captions file needs top-level 'images' and 'annotations' (found {found})")
    images = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not ({"coco_url", "file_name"} & set(im)):
            raise SourceFormatError(path, f"images[{i}] needs 'id' and 'coco_url' or 'file_name' (got {im!r:.120})")
        images[im["id"]] = im
    rows, seen = [], set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise SourceFormatError(path, f"annotations[{i}] needs 'image_id' and 'caption' (got {ann!r:.120})")
        im = images.get(ann["image_id"])
        if im is None:
            raise SourceFormatError(path, f"annotations[{i}] refers to image_id {ann['image_id']!r} not in 'images'")
        if spec.coco_captions == "first" and ann["image_id"] in seen:
            continue
        seen.add(ann["image_id"])
        if spec.images_root:
            if "file_name" not in im:
                raise SourceFormatError(path, f"images_root is set but image {im['id']} has no 'file_name'")
            url, local, problem = _locate(spec.images_root, str(im["file_name"]))
        elif im.get("coco_url"):
            url, local, problem = im["coco_url"], None, None
        else:
            raise SourceFormatError(path, f"image {im['id']} has no 'coco_url'; set SourceSpec.images_root")
        extra = {k: v for k, v in im.items() if k != "coco_url"}
        extra["annotation_id"] = ann.get("id")
        rows.append((url, local, ann["caption"], json.dumps(extra, default=str, ensure_ascii=False), problem))
    return _table(*zip(*rows)) if rows else _table([], [], [], [])


def read_diffusiondb(spec: SourceSpec) -> pd.DataFrame:
    """DiffusionDB metadata.parquet; each image read from its part zip (or extracted folder, or URL base)."""
    path = _join(spec.path, "metadata.parquet") if _isdir(spec.path) else spec.path
    df = _read_parquet(path)
    _require(path, df.columns, ["image_name", "prompt", "part_id"], "DiffusionDB metadata")
    root = spec.images_root or _parent(path)
    urls, locals_, problems = [], [], []
    part_cache: dict[int, str] = {}
    for name, part in zip(df["image_name"], df["part_id"]):
        part_name = f"part-{int(part):06d}"
        if _is_url_base(root):
            urls.append(f"{root.rstrip('/')}/{part_name}/{name}")
            locals_.append(None)
            problems.append(None)
            continue
        if part not in part_cache:
            part_cache[part] = _part_location(root, part_name)
        loc = part_cache[part]
        problem = None if loc.endswith(".zip") else _outside(str(name))  # zip members cannot leave their zip
        urls.append(None)
        problems.append(problem)
        locals_.append(None if problem else f"zip://{name}::{loc}" if loc.endswith(".zip") else _join(loc, str(name)))
    return _table(urls, locals_, df["prompt"], _extras(df, ["prompt"]), problems)


def _part_location(root: str, part_name: str) -> str:
    """The part's zip or extracted folder; a missing part becomes a per-row download reject later."""
    for cand in (f"{part_name}.zip", f"images/{part_name}.zip", part_name, f"images/{part_name}"):
        if _exists(_join(root, cand)):
            return _join(root, cand)
    return _join(root, f"{part_name}.zip")


def read_hpdv2(spec: SourceSpec) -> pd.DataFrame:
    """HPDv2 train.json / test.json: one sample per (prompt, image); preferred images only by default."""
    path = spec.path
    data = _read_json(path)
    if not isinstance(data, list):
        raise SourceFormatError(path, f"an HPDv2 annotation file is a JSON list, got {type(data).__name__}")
    split = "test" if posixpath.basename(path).startswith("test") else "train"
    root = spec.images_root or _hpdv2_root(data, path, split)
    rows = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "prompt" not in entry:
            raise SourceFormatError(path, f"entry [{i}] needs 'prompt' (got {entry!r:.120})")
        if "file_path" in entry:  # train.json layout
            files, pref = entry["file_path"], entry.get("human_preference")
            preferred = [p == 1 for p in pref] if isinstance(pref, list) and len(pref) == len(files) else None
        elif "image_path" in entry:  # test.json layout
            files, rank = entry["image_path"], entry.get("rank")
            preferred = [r == min(rank) for r in rank] if isinstance(rank, list) and len(rank) == len(files) else None
        else:
            raise SourceFormatError(path, f"entry [{i}] needs 'file_path' (train.json) or 'image_path' (test.json)")
        if not isinstance(files, list):
            raise SourceFormatError(path, f"entry [{i}]: image paths must be a list, got {type(files).__name__}")
        if spec.hpdv2_images == "preferred" and preferred is None:
            raise SourceFormatError(
                path, f"entry [{i}]: 'human_preference'/'rank' missing or not one per image; use hpdv2_images='all'"
            )
        for j, f in enumerate(files):
            if spec.hpdv2_images == "preferred" and not preferred[j]:
                continue
            url, local, problem = _locate(root, str(f))
            extra = {"split": split, "entry": i, "index": j, "file": f, "preferred": None if preferred is None else preferred[j]}
            for k in ("human_preference", "rank", "user_hash"):
                if isinstance(entry.get(k), list) and len(entry[k]) == len(files):
                    extra[k] = entry[k][j]
            rows.append((url, local, entry["prompt"], json.dumps(extra, default=str, ensure_ascii=False), problem))
    return _table(*zip(*rows)) if rows else _table([], [], [], [])


def _hpdv2_root(data: list, path: str, split: str) -> str:
    """``<json folder>/<split>`` (the HPSv2 layout), or the JSON's folder when paths already start with the split."""
    first = next((e.get("file_path") or e.get("image_path") for e in data if isinstance(e, dict)), None)
    if isinstance(first, list) and first and str(first[0]).replace("\\", "/").startswith(f"{split}/"):
        return _parent(path)
    return _join(_parent(path), split)


# -- helpers for url lists ------------------------------------------------------------------------
def _format_from_name(path: str) -> str:
    name = path.lower()
    for ext, fmt in ((".csv", "csv"), (".tsv", "tsv"), (".parquet", "parquet"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(ext):
            return fmt
    raise SourceFormatError(path, "cannot tell the URL list format from the extension; set SourceSpec.format to one of csv, tsv, parquet, jsonl")


def _read_table(path: str, fmt: str) -> pd.DataFrame:
    if fmt == "parquet":
        return _read_parquet(path)
    data = _read_bytes(path)
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        if fmt in ("csv", "tsv"):
            return pd.read_csv(
                io.BytesIO(data), sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False,
                encoding="utf-8", encoding_errors="surrogateescape",
            )
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SourceFormatError(path, f"invalid JSON on line {n}: {e.msg}") from None
        if not all(isinstance(r, dict) for r in rows):
            raise SourceFormatError(path, "every jsonl line must be a JSON object")
        return pd.DataFrame(rows)
    except SourceFormatError:
        raise
    except Exception as e:  # pandas parser errors
        raise SourceFormatError(path, f"not a readable {fmt} file ({e})") from None


def _expand(path: str, ext: str | None) -> list[str]:
    """A file, or every file in a folder (with ``ext``, or any known URL-list extension), sorted."""
    if not _isdir(path):
        if not _exists(path):
            raise SourceFormatError(path, "file not found")
        return [path]
    fs, p = fsspec.core.url_to_fs(path)
    exts = (ext,) if ext else (".csv", ".tsv", ".parquet", ".jsonl")
    proto = "" if "://" not in path else path.split("://", 1)[0] + "://"
    files = sorted(proto + f if proto else f for f in fs.ls(p, detail=False) if f.lower().endswith(exts))
    if not files:
        raise SourceFormatError(path, f"folder holds no {' / '.join(exts)} files")
    return files


def read_webdataset(spec: SourceSpec) -> pd.DataFrame:
    """WebDataset tar shards: one row per sample, its image a ``tar://<member>::<shard>`` local path (``wds.py``).

    The ``.json``'s ``url`` becomes the row's URL when it is http(s) (provenance, and ``duplicate_url`` across
    sources); the image is never fetched from it. Other URLs stay in the extras only.
    """
    try:
        rows = read_webdataset_rows(spec.path, spec.max_rows)
    except ShardError as e:
        raise SourceFormatError(e.path, e.problem) from None
    for row in rows:
        if row["url"] is not None and url_problem(row["url"]):
            row["url"] = None
    if not rows:
        return _table([], [], [], [])
    return pd.DataFrame(rows, columns=SOURCE_COLUMNS)


ADAPTERS: dict[str, Callable[[SourceSpec], pd.DataFrame]] = {
    "laion_parquet": read_laion_parquet,
    "coco_json": read_coco_json,
    "diffusiondb": read_diffusiondb,
    "hpdv2": read_hpdv2,
    "url_list": read_url_list,
    "webdataset": read_webdataset,
}


def read_source(spec: SourceSpec) -> pd.DataFrame:
    """The source's rows (``SOURCE_COLUMNS``), at most ``spec.max_rows``; raises SourceFormatError."""
    if spec.kind not in ADAPTERS:
        raise ValueError(f"no file adapter for kind {spec.kind!r}; valid kinds: {sorted(ADAPTERS)}")
    df = ADAPTERS[spec.kind](spec)
    return df.head(spec.max_rows) if spec.max_rows else df
