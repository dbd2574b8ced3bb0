"""The written schemas of the curate stage's files, and the one writer/reader pair for rejects.

Every step's table is a Parquet file in its stage folder:

- ``samples.parquet`` (collect): ``SAMPLE_COLUMNS`` (``local_path``: an absolute path or fsspec URL, or
  a path relative to the collect folder for images stored inside it; ``extra``: a JSON object);
- ``downloaded.parquet`` (download): ``SAMPLE_COLUMNS`` + image, width, height, sha256;
- ``scores.parquet`` (score): ``SCORES_SCHEMA``, every downloaded row's key, sha256 and HPS score (no images);
- ``decisions.parquet`` (filter): ``DECISIONS_SCHEMA``, the global keep rule's verdict per scored row;
- ``scored.parquet`` (filter): the kept rows, ``SAMPLE_COLUMNS`` + image columns + hps_score, hps_version;
- ``captioned.parquet`` (recaption): + caption, caption_source, caption_reason;
- ``rejects.parquet`` (every step): ``REJECT_COLUMNS``, one row per input row the step dropped; ``reason``
  is a code of ``reasons.REASONS``, ``detail`` the specifics.

The final shards' schema, ``CURATED_COLUMNS``, lives in ``shards.py`` with its checked reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sd_distill.curate.reasons import check_reasons

_STR = pa.string()
SAMPLE_SCHEMA = pa.schema(
    [("key", _STR), ("source", _STR), ("url", _STR), ("local_path", _STR), ("caption_original", _STR), ("extra", _STR)]
)
DOWNLOADED_SCHEMA = SAMPLE_SCHEMA.append(pa.field("image", pa.binary())).append(pa.field("width", pa.int32())).append(
    pa.field("height", pa.int32())
).append(pa.field("sha256", _STR))
SCORED_SCHEMA = DOWNLOADED_SCHEMA.append(pa.field("hps_score", pa.float32())).append(pa.field("hps_version", _STR))
CAPTIONED_SCHEMA = SCORED_SCHEMA.append(pa.field("caption", _STR)).append(pa.field("caption_source", _STR)).append(
    pa.field("caption_reason", _STR)
)
SCORES_SCHEMA = pa.schema(
    [("key", _STR), ("source", _STR), ("url", _STR), ("caption_original", _STR), ("sha256", _STR),
     ("hps_score", pa.float32()), ("hps_version", _STR)]
)
DECISIONS_SCHEMA = pa.schema([("key", _STR), ("kept", pa.bool_()), ("hps_score", pa.float32()), ("hps_version", _STR)])
SAMPLE_COLUMNS = SAMPLE_SCHEMA.names
IMAGE_COLUMNS = ["image", "width", "height", "sha256"]
SCORE_COLUMNS = ["hps_score", "hps_version"]
CAPTION_COLUMNS = ["caption", "caption_source", "caption_reason"]

REJECTS_FILE = "rejects.parquet"
REJECT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("url", pa.string()),
        ("caption_original", pa.string()),
        ("stage", pa.string()),  # collect | download | filter | recaption
        ("reason", pa.string()),  # a code from sd_distill.curate.reasons.REASONS (checked on write and read)
        ("detail", pa.string()),  # the specifics: the library's raw error text, the kept duplicate's key, the threshold...
        ("hps_score", pa.float32()),  # the score for filter rejects, null otherwise
    ]
)
REJECT_COLUMNS = REJECT_SCHEMA.names


def rejects_frame(rows: pd.DataFrame, stage: str, reason, detail=None, hps_score=None) -> pd.DataFrame:
    """Reject records for ``rows`` (which carry key, source, url, caption_original)."""
    n = len(rows)

    def col(v, default):
        if v is None:
            return [default] * n
        if isinstance(v, (str, float, int)):
            return [v] * n
        return list(v)

    return pd.DataFrame(
        {
            "key": list(rows["key"]),
            "source": list(rows["source"]),
            "url": list(rows["url"]) if "url" in rows else [None] * n,
            "caption_original": list(rows["caption_original"]),
            "stage": [stage] * n,
            "reason": col(reason, None),
            "detail": col(detail, None),
            "hps_score": np.asarray(col(hps_score, np.nan), dtype=np.float32),
        },
        columns=REJECT_COLUMNS,
    )


def empty_rejects() -> pd.DataFrame:
    return REJECT_SCHEMA.empty_table().to_pandas()


def write_rejects(rejects: list[pd.DataFrame] | pd.DataFrame, path: Path) -> int:
    """Write reject records with the fixed schema; returns the row count."""
    frames = [rejects] if isinstance(rejects, pd.DataFrame) else list(rejects)
    df = pd.concat([f for f in frames if len(f)] or [empty_rejects()], ignore_index=True)
    check_reasons(df["reason"])
    table = pa.Table.from_pandas(df[REJECT_COLUMNS], schema=REJECT_SCHEMA, preserve_index=False)
    pq.write_table(table, path)
    return len(df)


def read_rejects(folder: Path) -> pd.DataFrame:
    """A step's rejects; raises ValueError naming the file when a column or a reason code is not the schema's."""
    path = Path(folder) / REJECTS_FILE
    if not path.exists():
        return empty_rejects()
    df = pq.read_table(path).to_pandas()
    missing = [c for c in REJECT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (found {list(df.columns)})")
    try:
        check_reasons(df["reason"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return df


def write_table(df: pd.DataFrame, path: Path) -> None:
    pq.write_table(pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False), path)


def read_table(folder: Path, name: str, required: list[str], columns: list[str] | None = None) -> pd.DataFrame:
    """A step's table, with the columns the next step needs checked (names the file and what is missing)."""
    path = Path(folder) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; is {Path(folder)} the output folder of the previous step?")
    names = pq.read_schema(path).names
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (found {names})")
    return pq.read_table(path, columns=columns).to_pandas()


class TableWriter:
    """Appends DataFrames to one Parquet file with a fixed schema (so all-null batches keep their types).

    ``with TableWriter(path, schema) as w: w.write(df)``; the file exists, with its schema, even when
    nothing was written. ``rows`` counts what was written.
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema, self.rows = Path(path), schema, 0
        self._writer = pq.ParquetWriter(self.path, schema)

    def write(self, df: pd.DataFrame) -> None:
        if len(df):
            self._writer.write_table(pa.Table.from_pandas(df[self.schema.names], schema=self.schema, preserve_index=False))
            self.rows += len(df)

    def close(self) -> None:
        if self._writer is not None:
            if self.rows == 0:
                self._writer.write_table(self.schema.empty_table())
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_table(folder: Path, name: str, required: list[str], batch_rows: int = 1024, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """A step's table in batches of at most ``batch_rows`` rows, columns checked first (like ``read_table``)."""
    path = Path(folder) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; is {Path(folder)} the output folder of the previous step?")
    pf = pq.ParquetFile(path)
    missing = [c for c in required if c not in pf.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (found {pf.schema_arrow.names})")
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        yield batch.to_pandas()
