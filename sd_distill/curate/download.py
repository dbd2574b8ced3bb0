"""Step 2, download: every sample's image through img2dataset -> ``downloaded.parquet`` + ``rejects.parquet``.

img2dataset itself does the fetching, resizing and encoding (``img2dataset.download``, parquet output,
``incremental_mode="incremental"`` so an interrupted run resumes at the first unfinished shard). Local
images take the same path: plain files as ``file://`` URLs, zip members, WebDataset tar members (one
streaming pass per shard) and remote fsspec files staged to a local folder first. ``served://<path>`` URLs (the toy world) are served from the collect
step's folder by ``sd_distill.toy.server.serve_folder`` on 127.0.0.1 for the duration of the download.

img2dataset spawns worker processes, so it runs in a child interpreter
(``python -m sd_distill.curate.img2dataset_child <args.json>``): callers in notebooks, scripts without an
``if __name__ == "__main__"`` guard, or Prefect workers are never re-imported by ``spawn``. Its workers
fetch through the network guard (``netguard.py``): http(s) only, and with
``DownloadParams.block_private_networks`` no loopback / private / link-local / reserved address, checked
on every connection including redirects; the toy server's own endpoint is the one exemption. IP literals
and ``localhost`` are refused here, before img2dataset starts.

After img2dataset, each image is checked with PIL and converted to 8-bit RGB when it is not already
(grayscale, 16-bit, palette; CMYK, alpha and animation are flattened by img2dataset's OpenCV decode),
then de-duplicated by the sha256 of the stored bytes. Every input row ends up in exactly one of the two
outputs; rejects carry a ``reasons.REASONS`` code (``http_4xx``, ``timeout``, ``not_an_image``,
``too_large``...) and img2dataset's own error text in ``detail``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from sd_distill.curate.collect import ARCHIVE_PREFIXES, SAMPLES_FILE
from sd_distill.curate.config import CurateParams, DownloadParams
from sd_distill.curate.netguard import Guard, precheck, url_problem
from sd_distill.curate.partitions import partition_bounds
from sd_distill.curate.reasons import classify_download_error
from sd_distill.curate.wds import TAR_PREFIX, extract_members, parse_member_path
from sd_distill.curate.schema import (
    DOWNLOADED_SCHEMA,
    IMAGE_COLUMNS,
    REJECTS_FILE,
    SAMPLE_COLUMNS,
    TableWriter,
    read_table,
    rejects_frame,
    write_rejects,
)
from sd_distill.progress import ProgressFn, report
from sd_distill.toy.server import serve_folder

DOWNLOADED_FILE = "downloaded.parquet"
SERVED = "served://"


# -- the child process ----------------------------------------------------------------------------
def img2dataset_kwargs(dl: DownloadParams, url_list: Path, output_folder: Path) -> dict:
    """Keyword arguments for ``img2dataset.download`` (one place maps our parameters to theirs)."""
    return dict(
        url_list=str(url_list),
        input_format="parquet",
        url_col="fetch_url",
        save_additional_columns=["curate_key"],
        output_folder=str(output_folder),
        output_format="parquet",
        image_size=dl.image_size,
        resize_mode=dl.resize_mode,
        encode_format=dl.encode_format,
        encode_quality=dl.quality,
        timeout=dl.timeout,
        retries=dl.retries,
        processes_count=dl.processes,
        thread_count=dl.threads,
        number_sample_per_shard=dl.shard_size,
        min_image_size=dl.min_image_size,
        max_image_area=float(dl.max_image_pixels),
        incremental_mode="incremental",
        extract_exif=False,
        compute_hash=None,
        distributor="multiprocessing",
        enable_wandb=False,
    )


def guard_of(dl: DownloadParams, served_base: str | None = None) -> Guard:
    """The network guard for ``dl``; the toy server's own endpoint (``served_base``) is exempt."""
    endpoints = ()
    if served_base:
        host_port = served_base.split("://", 1)[1]
        endpoints = (host_port,)
    return Guard(block_private=dl.block_private_networks, allowed_networks=tuple(dl.allowed_networks),
                 allowed_endpoints=endpoints, max_bytes=dl.max_image_bytes)


# -- inputs ---------------------------------------------------------------------------------------
def resolve_local_path(path: str, sources_dir: Path) -> str:
    """A collected ``local_path`` as an absolute path / fsspec URL (relative ones are inside ``sources_dir``)."""
    prefix, _, target = path.rpartition("::") if path.startswith(ARCHIVE_PREFIXES) else ("", "", path)
    if "://" not in target and not Path(target).is_absolute():
        target = str(Path(sources_dir).resolve() / target)
    return f"{prefix}::{target}" if prefix else target


def _staged_name(key: str, path: str) -> str:
    """The staged copy of an archive member or remote file (``<scheme>://<name>[::<archive>]``): key + its extension."""
    return key + (Path(path.split("::", 1)[0].split("://", 1)[1]).suffix or ".img")


def _stage_tar_members(samples: pd.DataFrame, sources_dir: Path, staging: Path) -> dict[str, str]:
    """Stage every ``tar://`` image into ``staging`` in one streaming pass per shard (an fsspec open per member
    would re-read the shard's index each time); returns key -> problem for the images that could not be."""
    wanted: dict[str, dict[str, Path]] = {}
    owner: dict[tuple[str, str], str] = {}
    for key, local in zip(samples["key"], samples["local_path"]):
        if isinstance(local, str) and local.startswith(TAR_PREFIX):
            path = resolve_local_path(local, sources_dir)
            member, shard = parse_member_path(path)
            target = staging / _staged_name(key, path)
            if not target.exists():
                wanted.setdefault(shard, {})[member] = target
                owner[(shard, member)] = key
    problems = {}
    for shard, targets in wanted.items():
        for member, problem in extract_members(shard, targets).items():
            problems[owner[(shard, member)]] = problem
    return problems


def _stage_local(key: str, path: str, staging: Path) -> str:
    """A ``file://`` URL img2dataset can read for a local path or fsspec URL (zip members are copied out)."""
    if "://" not in path or path.startswith("file://"):
        return "file://" + str(Path(path.removeprefix("file://")).resolve())
    target = staging / _staged_name(key, path)
    if not target.exists():
        with fsspec.open(path, "rb") as f:
            data = f.read()
        target.write_bytes(data)
    return "file://" + str(target.resolve())


def _fetch_urls(samples: pd.DataFrame, sources_dir: Path, staging: Path, served_base: str | None,
                guard: Guard) -> tuple[list[str | None], list[tuple[str, str] | None]]:
    """(fetch URL, (reason, detail) or None) per sample: served:// rewritten to the loopback server, local
    files staged, remote URLs checked again (http(s) only; IP literals and localhost by the guard)."""
    urls, errors = [], []
    tar_problems = _stage_tar_members(samples, sources_dir, staging)
    for key, url, local in zip(samples["key"], samples["url"], samples["local_path"]):
        try:
            if key in tar_problems:
                raise FileNotFoundError(f"local image unreadable: {tar_problems[key]}")
            if isinstance(local, str) and local:
                urls.append(_stage_local(key, resolve_local_path(local, sources_dir), staging))
            elif url.startswith(SERVED):
                urls.append(f"{served_base}/{url[len(SERVED):]}")
            else:
                problem = url_problem(url) or precheck(url, guard)
                if problem:
                    urls.append(None)
                    errors.append(problem)
                    continue
                urls.append(url)
            errors.append(None)
        except Exception as e:  # a missing zip, an unreadable member: one row's problem
            urls.append(None)
            errors.append(("local_unreadable", f"{type(e).__name__}: {e}"))
    return urls, errors


def _run_img2dataset(dl: DownloadParams, url_list: Path, output: Path, n: int, progress: ProgressFn | None, guard: Guard) -> None:
    args_file = output.parent / "img2dataset_args.json"
    guard_fields = {"block_private": guard.block_private, "allowed_networks": list(guard.allowed_networks),
                    "allowed_endpoints": list(guard.allowed_endpoints), "max_bytes": guard.max_bytes}
    args_file.write_text(json.dumps({**img2dataset_kwargs(dl, url_list, output), "_guard": guard_fields}))
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OPENCV_IO_MAX_IMAGE_PIXELS=str(dl.max_image_pixels))
    log = output.parent / "img2dataset.log"
    n_shards = max(1, math.ceil(n / dl.shard_size))
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sd_distill.curate.img2dataset_child", str(args_file)], stdout=logf, stderr=subprocess.STDOUT, env=env
        )
        last = -1
        while proc.poll() is None:
            done = len(list(output.glob("*_stats.json"))) if output.exists() else 0
            if done != last:  # shard-level progress: img2dataset writes a stats file per finished shard
                report(progress, min(done * dl.shard_size, n), n, f"img2dataset shards {done}/{n_shards}")
                last = done
            time.sleep(0.3)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"img2dataset exited with status {proc.returncode}; log {log}:\n{tail}")


# -- outputs --------------------------------------------------------------------------------------
def rgb_image_bytes(data: bytes, encode_format: str, quality: int) -> tuple[bytes, int, int, str | None]:
    """(bytes, width, height, conversion note): the image as 8-bit RGB, re-encoded only when it was not."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode == "RGB":
            return data, im.width, im.height, None
        mode = im.mode
        if mode.startswith("I;16") or mode == "I":
            arr = np.asarray(im, dtype=np.uint32) >> (8 if mode.startswith("I;16") else 24)
            rgb = Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
        else:
            rgb = im.convert("RGB")
    buf = io.BytesIO()
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[encode_format]
    kw = {"compress_level": quality} if fmt == "PNG" else {"quality": quality}
    rgb.save(buf, format=fmt, **kw)
    return buf.getvalue(), rgb.width, rgb.height, f"converted {mode} to RGB"


def _with_extra(extra: str, **fields) -> str:
    d = json.loads(extra) if extra else {}
    d.update({k: v for k, v in fields.items() if v is not None})
    return json.dumps(d, default=str, ensure_ascii=False)


def download_images(
    params: CurateParams,
    sources_dir: Path,
    out_dir: Path,
    progress: ProgressFn | None = None,
    work_dir: Path | None = None,
    partition: tuple[int, int] | None = None,
) -> dict:
    """Download (or read) every collected sample's image; write ``downloaded.parquet`` and ``rejects.parquet``.

    ``partition=(i, P)`` downloads only partition ``i`` of ``P`` (``sd_distill.curate.partitions``: a
    contiguous range of the samples); images are de-duplicated within it, and the filter step removes
    duplicates across partitions.

    img2dataset's raw shards live in ``work_dir`` (a persistent scratch folder the caller owns, e.g. the
    Prefect layer's per-stage work dir), else ``params.download.resume_dir``, else inside ``out_dir``;
    in the first two cases a rerun after an interruption resumes at the first unfinished shard.

    Returns counts ``{"in", "downloaded", "rejected", "reasons", "per_source": {name: {in, downloaded, rejected}}}``.
    """
    dl = params.download
    sources_dir, out_dir = Path(sources_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = read_table(sources_dir, SAMPLES_FILE, SAMPLE_COLUMNS)
    if partition is not None:
        lo, hi = partition_bounds(len(samples), *partition)
        samples = samples.iloc[lo:hi].reset_index(drop=True)
    n = len(samples)
    job_id = hashlib.sha256(
        json.dumps([samples["key"].tolist(), dl.model_dump(mode="json", exclude={"resume_dir"})]).encode()
    ).hexdigest()[:16]
    persistent = work_dir or dl.resume_dir
    work = Path(persistent) / job_id if persistent else out_dir / "_img2dataset"
    staging, output = work / "local", work / "shards"
    staging.mkdir(parents=True, exist_ok=True)
    rejects = []

    with ExitStack() as stack:
        served = samples["url"].fillna("").str.startswith(SERVED).any()
        base = stack.enter_context(serve_folder(sources_dir)) if served else None
        guard = guard_of(dl, base)
        fetch, errors = _fetch_urls(samples, sources_dir, staging, base, guard)
        unreadable = np.array([e is not None for e in errors], dtype=bool)
        if unreadable.any():
            bad = [e for e in errors if e]
            rejects.append(rejects_frame(samples.loc[unreadable], "download", [r for r, _ in bad], [d for _, d in bad]))
        todo = pd.DataFrame({"fetch_url": fetch, "curate_key": samples["key"].tolist()}).loc[~unreadable]
        if len(todo):
            url_list = work / "input.parquet"
            todo.to_parquet(url_list, index=False)
            _run_img2dataset(dl, url_list, output, len(todo), progress, guard)
    # one img2dataset shard at a time (memory: one shard's images), in sample order
    todo_samples = samples.loc[~unreadable].assign(_order=np.arange(int((~unreadable).sum())))
    first_by_hash: dict[str, str] = {}
    kept_per_source: dict[str, int] = {}
    seen: set[str] = set()
    with TableWriter(out_dir / DOWNLOADED_FILE, DOWNLOADED_SCHEMA) as writer:
        for shard in _result_shards(output, dl.encode_format):
            shard = shard[~shard["curate_key"].isin(seen)].drop_duplicates("curate_key", keep="last")
            seen.update(shard["curate_key"])
            merged = todo_samples.merge(shard, left_on="key", right_on="curate_key", how="inner").sort_values("_order")
            kept, shard_rejects = _shard_images(merged, dl, first_by_hash)
            writer.write(kept)
            rejects.extend(shard_rejects)
            for name, count in kept["source"].value_counts().items():
                kept_per_source[name] = kept_per_source.get(name, 0) + int(count)
    # rows img2dataset never reported (a shard that crashed twice): rejected, not lost
    missing = todo_samples[~todo_samples["key"].isin(seen)]
    if len(missing):
        rejects.append(rejects_frame(missing, "download", "no_result", "img2dataset returned no result (shard failed)"))
    n_kept = writer.rows
    n_rejected = write_rejects(rejects, out_dir / REJECTS_FILE)
    if not persistent:
        shutil.rmtree(work, ignore_errors=True)  # raw shards duplicate downloaded.parquet once it is written
    assert n_kept + n_rejected == n, f"download accounting does not close: {n_kept} + {n_rejected} != {n}"
    report(progress, n, n, f"{n_kept} images")
    return _counts(samples, kept_per_source, pd.concat(rejects, ignore_index=True) if rejects else None)


def _result_shards(output: Path, encode_format: str):
    cols = ["curate_key", "status", "error_message", encode_format, "original_width", "original_height"]
    for f in sorted(output.glob("*.parquet")):
        yield pq.read_table(f, columns=cols).to_pandas()


def _shard_images(merged: pd.DataFrame, dl: DownloadParams, first_by_hash: dict[str, str]) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """(kept rows, reject frames) of one shard: failures with img2dataset's words, RGB conversion, sha256 de-duplication."""
    rejects = []
    ok = (merged["status"] == "success") & merged[dl.encode_format].notna()
    failed = merged[~ok]
    if len(failed):
        detail = [str(e).strip() if isinstance(e, str) and e.strip() else f"img2dataset status {st}" for e, st in zip(failed["error_message"], failed["status"])]
        reason = [classify_download_error(d, st) for d, st in zip(detail, failed["status"])]
        rejects.append(rejects_frame(failed, "download", reason, detail))
    kept_rows, bad_rows, bad_reasons, dup_rows, dup_of = [], [], [], [], []
    for row in merged[ok].itertuples(index=False):
        try:
            data, w, h, note = rgb_image_bytes(getattr(row, dl.encode_format), dl.encode_format, dl.quality)
        except Exception as e:
            bad_rows.append(row._asdict())
            bad_reasons.append(f"image unreadable after resize: {type(e).__name__}: {e}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in first_by_hash:  # the first in sample order is kept
            dup_rows.append(row._asdict())
            dup_of.append(first_by_hash[digest])
            continue
        first_by_hash[digest] = row.key
        extra = _with_extra(
            row.extra, original_width=_int(row.original_width), original_height=_int(row.original_height), image_conversion=note
        )
        kept_rows.append({**{c: getattr(row, c) for c in SAMPLE_COLUMNS}, "extra": extra, "image": data, "width": w, "height": h, "sha256": digest})
    if bad_rows:
        rejects.append(rejects_frame(pd.DataFrame(bad_rows), "download", "not_an_image", bad_reasons))
    if dup_rows:
        rejects.append(rejects_frame(pd.DataFrame(dup_rows), "download", "duplicate_image", dup_of))
    return pd.DataFrame(kept_rows, columns=SAMPLE_COLUMNS + IMAGE_COLUMNS), rejects


def _int(v) -> int | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)


def _counts(samples: pd.DataFrame, kept_per_source: dict[str, int], rejects: pd.DataFrame | None) -> dict:
    per_source = {}
    for name, group in samples.groupby("source", sort=True):
        k = kept_per_source.get(name, 0)
        per_source[str(name)] = {"in": int(len(group)), "downloaded": k, "rejected": int(len(group) - k)}
    reasons = {} if rejects is None else {str(k): int(v) for k, v in rejects["reason"].value_counts().items()}
    return {
        "in": int(len(samples)),
        "downloaded": int(sum(kept_per_source.values())),
        "rejected": int(0 if rejects is None else len(rejects)),
        "reasons": reasons,
        "per_source": per_source,
    }

