"""Step 5, shards: the curated dataset as docs/design.md fixes it, and its checked reader.

``part-00000.parquet``, ``part-00001.parquet``, ... hold one row per kept sample with exactly
``CURATED_COLUMNS`` (+ the extras: ``local_path``, ``caption_reason`` and the JSON ``extra``);
``rejects.parquet`` holds every input row that was not kept, with its ``stage`` and ``reason``. With
``"webdataset"`` in ``CurateParams.output_formats`` the same rows, in the same order, also go to
``webdataset/shards-NNNNN.tar`` (``wds.WebDatasetWriter``: ``<key>.<ext>``, ``<key>.txt`` with the training
caption, ``<key>.json``), ``webdataset_shard_size`` samples each; the counts list every tar with its sha256.
Accounting closes per source: rows in = kept + rejected; ``write_shards`` checks it key by key
against the collect step's output and returns the counts for the manifest.

Readers (``read_curated``, ``iter_curated``) check each file's schema on load and name the file and
every missing or mistyped column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sd_distill.curate.collect import SAMPLES_FILE
from sd_distill.curate.config import CurateParams
from sd_distill.curate.recaption import CAPTIONED_FILE
from sd_distill.curate.schema import REJECT_COLUMNS, REJECTS_FILE, TableWriter, iter_table, read_rejects, read_table, write_rejects
from sd_distill.curate.wds import WebDatasetWriter, shard_pattern

WEBDATASET_DIR = "webdataset"

# column -> (pyarrow type check, what it must be); the written schema of every part file
CURATED_TYPES = {
    "key": (pa.types.is_string, "string"),
    "source": (pa.types.is_string, "string"),
    "url": (lambda t: pa.types.is_string(t) or pa.types.is_null(t), "string"),
    "image": (pa.types.is_binary, "binary (encoded image bytes)"),
    "width": (pa.types.is_integer, "integer"),
    "height": (pa.types.is_integer, "integer"),
    "sha256": (pa.types.is_string, "string"),
    "caption_original": (pa.types.is_string, "string"),
    "caption": (pa.types.is_string, "string"),
    "caption_source": (pa.types.is_string, "string"),
    "hps_score": (pa.types.is_floating, "float"),
    "hps_version": (pa.types.is_string, "string"),
}
CURATED_COLUMNS = list(CURATED_TYPES)
EXTRA_COLUMNS = ["local_path", "caption_reason", "extra"]
CURATED_SCHEMA = pa.schema(
    [
        ("key", pa.string()), ("source", pa.string()), ("url", pa.string()), ("image", pa.binary()),
        ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("caption_original", pa.string()),
        ("caption", pa.string()), ("caption_source", pa.string()), ("hps_score", pa.float32()),
        ("hps_version", pa.string()), ("local_path", pa.string()), ("caption_reason", pa.string()), ("extra", pa.string()),
    ]
)


def write_shards(
    params: CurateParams, captioned_dir: Path | Sequence[Path], upstream_rejects: Sequence[Path], out_dir: Path
) -> dict:
    """Write the part files and the merged rejects; return per-source counts (in = kept + rejected, checked).

    ``captioned_dir``: the recaption step's folder, or the folders of every partition in index order
    (partitions are contiguous ranges of the samples, so their concatenation is in sample order and
    the parts come out as an unpartitioned run writes them). ``upstream_rejects``: the folders of the
    earlier steps (collect, download(s), filter); their ``rejects.parquet`` files are merged with the
    recaption steps'. When the collect folder is among them, every collected key must appear exactly
    once in kept or rejected (AssertionError otherwise).

    Merged rejects are ordered by stage (collect, download, filter, recaption), then by sample order,
    and a ``duplicate_image`` reject names the key finally kept (a partition's first copy of an image
    may itself be a duplicate of an earlier partition's), so they too do not depend on the partitioning.
    """
    captioned_dirs = [Path(captioned_dir)] if isinstance(captioned_dir, (str, Path)) else [Path(d) for d in captioned_dir]
    if not captioned_dirs:
        raise ValueError("write_shards needs at least one captioned folder")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    required = CURATED_COLUMNS + EXTRA_COLUMNS
    kept = pd.concat([read_table(d, CAPTIONED_FILE, required, columns=["key", "source"]) for d in captioned_dirs], ignore_index=True)
    folders = [Path(d) for d in upstream_rejects]
    all_rejects = [read_rejects(d) for d in folders + captioned_dirs]
    rejects = pd.concat([r for r in all_rejects if len(r)] or [all_rejects[0]], ignore_index=True)[REJECT_COLUMNS]
    collect_dir = next((d for d in folders if (d / SAMPLES_FILE).exists()), None)
    sample_keys = read_table(collect_dir, SAMPLES_FILE, ["key"], columns=["key"])["key"] if collect_dir is not None else None
    rejects = ordered_rejects(resolved_duplicates(rejects), sample_keys)

    # accounting: in = kept + rejected, per source, and key by key against what was collected
    overlap = set(kept["key"]) & set(rejects["key"])
    assert not overlap, f"{len(overlap)} keys are both kept and rejected, e.g. {sorted(overlap)[:3]}"
    assert rejects["key"].is_unique, "a sample was rejected twice"
    if collect_dir is not None:
        collected = pd.concat(
            [read_table(collect_dir, SAMPLES_FILE, ["key", "source"])[["key", "source"]], read_rejects(collect_dir)[["key", "source"]]]
        )
        accounted = pd.concat([kept[["key", "source"]], rejects[["key", "source"]]])
        lost = set(collected["key"]) - set(accounted["key"])
        assert not lost, f"{len(lost)} collected samples are neither kept nor rejected, e.g. {sorted(lost)[:3]}"
        assert len(accounted) == len(collected), "more rows out than in"
    per_source = {}
    for name in sorted(set(kept["source"]) | set(rejects["source"])):
        r = rejects[rejects["source"] == name]
        k = int((kept["source"] == name).sum())
        by_reason = r.groupby(["stage", "reason"]).size()
        per_source[str(name)] = {
            "in": k + len(r),
            "kept": k,
            "rejected": int(len(r)),
            "rejected_by_reason": {f"{s}/{reason}": int(v) for (s, reason), v in by_reason.items()},
        }
        if collect_dir is not None:
            assert per_source[name]["in"] == int((collected["source"] == name).sum()), f"accounting does not close for {name}"

    # parts of shard_rows rows, in the captioned files' (deterministic) order, one batch in memory at a time
    n_parts, writer = 0, None
    tars = WebDatasetWriter(out_dir / WEBDATASET_DIR, params.webdataset_shard_size) if "webdataset" in params.output_formats else None
    batches = (b for d in captioned_dirs for b in iter_table(d, CAPTIONED_FILE, required, params.shard_rows))
    for batch in batches:
        if tars is not None:
            tars.write(batch.to_dict("records"))
        while len(batch):
            if writer is None:
                writer = TableWriter(out_dir / f"part-{n_parts:05d}.parquet", CURATED_SCHEMA)
                n_parts += 1
            take = params.shard_rows - writer.rows
            writer.write(batch.iloc[:take])
            batch = batch.iloc[take:]
            if writer.rows >= params.shard_rows:
                writer.close()
                writer = None
    if writer is not None:
        writer.close()
    if n_parts == 0:  # nothing kept: one empty part keeps the schema readable
        TableWriter(out_dir / "part-00000.parquet", CURATED_SCHEMA).close()
        n_parts = 1
    write_rejects(rejects, out_dir / REJECTS_FILE)
    counts = {
        "in": int(len(kept) + len(rejects)),
        "kept": int(len(kept)),
        "rejected": int(len(rejects)),
        "shards": n_parts,
        "per_source": per_source,
    }
    if tars is not None:
        written = [{**t, "path": f"{WEBDATASET_DIR}/{t['path']}"} for t in tars.close()]
        pattern = shard_pattern(written)
        counts["webdataset"] = {"pattern": pattern and f"{WEBDATASET_DIR}/{pattern}", "samples": sum(t["samples"] for t in written),
                                "shards": written}
    return counts


STAGE_ORDER = ("collect", "download", "filter", "recaption")


def resolved_duplicates(rejects: pd.DataFrame) -> pd.DataFrame:
    """``duplicate_image`` rejects whose ``detail`` (the key kept) is itself a duplicate point to that one's original."""
    dup = rejects["reason"] == "duplicate_image"
    if not dup.any():
        return rejects
    original = dict(zip(rejects.loc[dup, "key"], rejects.loc[dup, "detail"]))
    resolved = []
    for key in rejects.loc[dup, "detail"]:
        seen = set()
        while key in original and key not in seen:  # a cycle cannot happen; the guard keeps a bad file from hanging
            seen.add(key)
            key = original[key]
        resolved.append(key)
    out = rejects.copy()
    out.loc[dup, "detail"] = resolved
    return out


def ordered_rejects(rejects: pd.DataFrame, sample_keys: pd.Series | None) -> pd.DataFrame:
    """Rejects sorted by stage (``STAGE_ORDER``), then by position in ``sample_keys`` (stable otherwise)."""
    stage = rejects["stage"].map({s: i for i, s in enumerate(STAGE_ORDER)}).fillna(len(STAGE_ORDER))
    position = rejects["key"].map(pd.Series(range(len(sample_keys)), index=sample_keys.to_numpy())) if sample_keys is not None else None
    order = pd.DataFrame({"stage": stage, "position": -1 if position is None else position.fillna(-1)})
    return rejects.loc[order.sort_values(["stage", "position"], kind="stable").index].reset_index(drop=True)


# -- readers ------------------------------------------------------------------------------------------
def curated_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no part-*.parquet files; is it a curate/shards stage folder?")
    return files


def check_curated_schema(path: Path, schema: pa.Schema, columns: Sequence[str] | None = None) -> None:
    """Raise ValueError naming the file and every missing or mistyped column of the curated schema."""
    wanted = CURATED_COLUMNS if columns is None else [c for c in columns if c in CURATED_TYPES]
    problems = []
    for name in wanted:
        if name not in schema.names:
            problems.append(f"missing column {name!r}")
            continue
        check, what = CURATED_TYPES[name]
        t = schema.field(name).type
        if not check(t):
            problems.append(f"column {name!r} is {t}, expected {what}")
    if columns is not None:
        unknown = [c for c in columns if c not in schema.names]
        problems += [f"requested column {c!r} does not exist" for c in unknown if c not in CURATED_TYPES]
    if problems:
        raise ValueError(f"{path}: not a curated shard: " + "; ".join(problems))


def iter_curated(folder: Path, columns: Sequence[str] | None = None, batch_rows: int = 1024) -> Iterator[pd.DataFrame]:
    """The curated rows in batches of at most ``batch_rows``, each part file's schema checked first."""
    for path in curated_files(folder):
        pf = pq.ParquetFile(path)
        check_curated_schema(path, pf.schema_arrow, columns)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None):
            yield batch.to_pandas()


def read_curated(folder: Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Every curated row as one DataFrame (schema checked on load)."""
    frames = []
    for path in curated_files(folder):
        schema = pq.read_schema(path)
        check_curated_schema(path, schema, columns)
        frames.append(pq.read_table(path, columns=list(columns) if columns else None).to_pandas())
    return pd.concat(frames, ignore_index=True)
