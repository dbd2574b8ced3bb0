"""WebDataset tar shards, as img2dataset writes them: the ``webdataset`` source and the curated set's tar output.

The format (webdataset's conventions, img2dataset's ``output_format="webdataset"``): a shard is a plain tar
whose members are grouped into samples by key, the member name up to the first ``.`` of its base name
(``000000012.jpg``, ``000000012.txt``, ``000000012.json`` are sample ``000000012``'s image, caption and
metadata). Shards are given as a folder (every ``*.tar`` in it, sorted), a brace pattern
(``shards-{00000..00009}.tar``) or a single file, each a local path or an fsspec URL.

Reading (``read_webdataset``, the source adapter of ``sources.py``): each shard is streamed once; a sample
becomes one source row whose ``local_path`` is ``tar://<member>::<shard>`` (fsspec's chained-URL form),
whose caption is the ``.txt`` member's bytes (checked by ``collect`` like every caption) and whose extras are
the ``.json`` fields (url, width, height, similarity, ...) plus the key and shard. The image is not read here:
the download step stages the members with ``extract_members`` (one pass per shard) and hands them to
img2dataset as ``file://`` URLs, so they get the same decode checks, resizing, RGB conversion and
de-duplication as every other local image, and no network fetch. Row problems become rejects at collect:
a sample without an image member is ``image_missing``, without a caption ``caption_missing``, and the
sample a damaged shard breaks off in is ``tar_damaged`` (the complete samples before it are kept). A file
that is not a tar at all is a ``SourceFormatError`` naming it.

Writing (``WebDatasetWriter``): ``<key>.<ext>`` (the curated image bytes), ``<key>.txt`` (the training
caption) and ``<key>.json`` (``SAMPLE_JSON_FIELDS``) in shards ``shards-NNNNN.tar`` of at most
``samples_per_shard`` samples, with deterministic headers (mtime 0, fixed owner), so the same curated rows
give byte-identical tars.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from pathlib import Path
from typing import Iterable

import fsspec
from braceexpand import braceexpand

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample holds several
SHARD_EXTS = (".tar", ".tar.gz", ".tgz")
TAR_PREFIX = "tar://"
# <key>.json of the curated output: where each field comes from in the curated row
SAMPLE_JSON_FIELDS = ("key", "source", "url", "caption_original", "caption", "caption_source", "hps_score",
                      "hps_version", "width", "height", "sha256")
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


class ShardError(ValueError):
    """A shard list or shard that cannot be read (names the path and the problem)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


# -- naming ---------------------------------------------------------------------------------------------
def split_member(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name, webdataset's rule: the key ends at the first ``.`` of the base name."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), (ext.lower() if dot else "")


def member_path(member: str, shard: str) -> str:
    """``tar://<member>::<shard>``: where a sample's image is, as a ``local_path``."""
    return f"{TAR_PREFIX}{member}::{shard}"


def parse_member_path(path: str) -> tuple[str, str]:
    """(member, shard) of a ``tar://<member>::<shard>`` path."""
    member, _, shard = path[len(TAR_PREFIX):].partition("::")
    if not path.startswith(TAR_PREFIX) or not member or not shard:
        raise ValueError(f"not a tar member path (tar://<member>::<shard>): {path!r}")
    return member, shard


def shard_urls(path: str) -> list[str]:
    """The shards ``path`` names: a brace pattern's expansion, a folder's ``*.tar`` files (sorted), or one file."""
    fs, p = fsspec.core.url_to_fs(path)
    proto = path.split("://", 1)[0] + "://" if "://" in path else ""
    if "{" in path:
        urls = list(braceexpand(path))
        missing = [u for u in urls if not fsspec.core.url_to_fs(u)[0].exists(fsspec.core.url_to_fs(u)[1])]
        if missing:
            raise ShardError(path, f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[:3]}")
        return urls
    if fs.isdir(p):
        urls = sorted(proto + f if proto and not f.startswith(proto) else f
                      for f in fs.ls(p, detail=False) if f.lower().endswith(SHARD_EXTS))
        if not urls:
            raise ShardError(path, f"folder holds no {' / '.join(SHARD_EXTS)} shards")
        return urls
    if not fs.exists(p):
        raise ShardError(path, "file not found")
    return [path]


# -- reading --------------------------------------------------------------------------------------------
def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    return b"" if f is None else f.read()


def _ends_with_end_marker(f, offset: int) -> bool:
    """Whether at least one 512-byte block follows the last member: tarfile's stream reader stops without an
    error at a header cut short, so a shard truncated between members is caught here. Unseekable: assumed."""
    try:
        return f.seek(0, 2) - offset >= tarfile.BLOCKSIZE
    except (OSError, ValueError, io.UnsupportedOperation):
        return True


def read_shard_samples(shard: str, limit: int | None = None) -> tuple[list[dict], str | None]:
    """(samples, damage) of one shard, in member order, reading captions and metadata but not images.

    Each sample: ``{"key", "members": {ext: member name}, "txt": bytes | None, "json": bytes | None}``.
    ``damage`` is None for a complete shard, else the error where reading stopped; the samples completed
    before it are returned and the last one is marked ``"damaged": True``. A shard whose first member
    cannot be read is a ``ShardError``.
    """
    samples: dict[str, dict] = {}
    damage = None
    n_members = 0
    try:
        with fsspec.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            complete = True
            for member in tar:
                n_members += 1
                if not member.isfile():
                    continue
                key, ext = split_member(member.name)
                if key not in samples:
                    if limit is not None and len(samples) >= limit:
                        complete = False
                        break
                    samples[key] = {"key": key, "members": {}, "txt": None, "json": None}
                sample = samples[key]
                sample["members"].setdefault(ext, member.name)
                if ext in ("txt", "json") and sample[ext] is None:
                    sample[ext] = _member_bytes(tar, member)
            if complete and not _ends_with_end_marker(f, tar.offset):
                raise tarfile.ReadError("the shard ends without the end-of-archive blocks (truncated)")
    except FileNotFoundError:
        raise ShardError(shard, "file not found") from None
    except _TAR_ERRORS as e:
        if n_members <= 1 and not samples:
            raise ShardError(shard, f"not a readable tar file ({type(e).__name__}: {e})") from None
        damage = f"{type(e).__name__}: {e}"
        if samples:
            next(reversed(samples.values()))["damaged"] = True
    return list(samples.values()), damage


def sample_row(sample: dict, shard: str, damage: str | None) -> dict:
    """One source row (``sources.SOURCE_COLUMNS`` fields) of a shard's sample."""
    members = sample["members"]
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    meta, meta_error = {}, None
    if sample["json"] is not None:
        try:
            meta = json.loads(sample["json"].decode("utf-8", errors="surrogateescape"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            meta_error = f"{type(e).__name__}: {e}"
        if not isinstance(meta, dict):
            meta, meta_error = {}, meta_error or f"{sample['key']}.json is not a JSON object"
    caption = sample["txt"]
    if caption is None and isinstance(meta.get("caption"), str):
        caption = meta["caption"]  # img2dataset repeats the caption in the json
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    extra = {k: v for k, v in meta.items() if k != "caption"}
    extra.update({"wds_key": sample["key"], "shard": shard, "members": sorted(members)})
    if meta_error:
        extra["json_error"] = meta_error
    reason = detail = None
    if sample.get("damaged"):
        reason, detail = "tar_damaged", f"{shard} breaks off in sample {sample['key']!r}: {damage}"
    elif image_ext is None:
        reason, detail = "image_missing", f"sample {sample['key']!r} has members {sorted(members)}, no {'/'.join(IMAGE_EXTS)}"
    elif caption is None:
        reason, detail = "caption_missing", f"sample {sample['key']!r} has no .txt member and no caption in its .json"
    return {
        "url": url,
        "local_path": member_path(members[image_ext], shard) if image_ext and reason is None else None,
        "caption_raw": caption,
        "extra": json.dumps(extra, default=str, ensure_ascii=False),
        "problem": detail,
        "problem_reason": reason,
    }


def read_webdataset_rows(path: str, max_rows: int | None = None) -> list[dict]:
    """Every sample of every shard ``path`` names, as source rows (see the module docstring)."""
    rows: list[dict] = []
    for shard in shard_urls(path):
        left = None if max_rows is None else max_rows - len(rows)
        if left is not None and left <= 0:
            break
        samples, damage = read_shard_samples(shard, limit=left)
        rows += [sample_row(s, shard, damage) for s in samples]
    return rows


def extract_members(shard: str, targets: dict[str, Path]) -> dict[str, str]:
    """Write each wanted member (member name -> target file) of one shard in one streaming pass.

    Returns member -> problem for the members not written (absent from the shard, or cut off by damage).
    """
    left = dict(targets)
    problems: dict[str, str] = {}
    try:
        with fsspec.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                target = left.get(member.name)
                if target is None or not member.isfile():
                    continue
                data = _member_bytes(tar, member)
                if len(data) != member.size:
                    problems[member.name] = f"{member.name} in {shard}: {len(data)} of {member.size} bytes"
                else:
                    Path(target).write_bytes(data)
                del left[member.name]
                if not left:
                    break
    except _TAR_ERRORS as e:
        problems.update({m: f"{shard}: {type(e).__name__}: {e}" for m in left})
        return problems
    problems.update({m: f"no member {m!r} in {shard}" for m in left})
    return problems


# -- writing --------------------------------------------------------------------------------------------
def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def image_ext(data: bytes) -> str:
    """The file extension of encoded image bytes, from their magic number (the curated set stores png/jpg/webp)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError(f"image bytes are not PNG, JPEG or WebP (starts {data[:12]!r})")


class WebDatasetWriter:
    """Curated rows -> ``<folder>/shards-NNNNN.tar``; ``write(rows)`` / ``close()`` like every writer here.

    ``shards`` lists what was written: ``{"path": <relative to folder>, "samples": n, "sha256", "size"}``.
    """

    def __init__(self, folder: Path, samples_per_shard: int, name: str = "shards"):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.folder, self.per_shard, self.name = Path(folder), samples_per_shard, name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._n = 0

    def _add(self, name: str, data: bytes) -> None:
        self._tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))

    def write(self, rows: Iterable[dict]) -> None:
        for row in rows:
            if self._tar is None:
                path = self.folder / f"{self.name}-{len(self.shards):05d}.tar"
                self._tar = tarfile.open(path, "w")
                self.shards.append({"path": path.name, "samples": 0})
                self._n = 0
            key = str(row["key"])
            self._add(f"{key}.{image_ext(row['image'])}", row["image"])
            self._add(f"{key}.txt", str(row["caption"]).encode("utf-8"))
            self._add(f"{key}.json", json.dumps(sample_json(row), ensure_ascii=False, sort_keys=True).encode("utf-8"))
            self._n += 1
            self.shards[-1]["samples"] = self._n
            if self._n >= self.per_shard:
                self._finish()

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            entry = self.shards[-1]
            data = (self.folder / entry["path"]).read_bytes()
            entry.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))

    def close(self) -> list[dict]:
        self._finish()
        return self.shards

    def __enter__(self) -> "WebDatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sample_json(row: dict) -> dict:
    """The ``<key>.json`` of one curated row: ``SAMPLE_JSON_FIELDS`` plus the source's own extras (``extra``)."""
    out = {}
    for field in SAMPLE_JSON_FIELDS:
        value = row.get(field)
        if hasattr(value, "item"):  # numpy scalars
            value = value.item()
        if isinstance(value, float) and value != value:
            value = None
        out[field] = value
    if isinstance(out["hps_score"], float):
        out["hps_score"] = round(out["hps_score"], 6)
    extra = row.get("extra")
    out["extra"] = json.loads(extra) if isinstance(extra, str) and extra else {}
    return out


def shard_pattern(shards: list[dict], name: str = "shards") -> str | None:
    """The brace pattern naming every written shard (what ``webdataset.WebDataset`` takes), or None for none."""
    if not shards:
        return None
    return f"{name}-00000.tar" if len(shards) == 1 else f"{name}-{{00000..{len(shards) - 1:05d}}}.tar"
