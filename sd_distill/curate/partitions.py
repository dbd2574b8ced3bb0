"""Partitions of the collected samples: the unit the curate stage fans out over (download, score, recaption).

Partition ``i`` of ``P`` is the contiguous range of rows ``[floor(i n / P), floor((i + 1) n / P))`` of
``samples.parquet`` in its written order (sources in the order given, rows in file order). Contiguous
ranges rather than a hash of the key, because:

- concatenating the partitions in index order gives back the sample order, so the merged shards and
  the cross-partition de-duplication ("the first image in sample order is kept") come out exactly as
  an unpartitioned run writes them, with no sort and no global position column;
- sizes differ by at most one row (a hash split is balanced only in expectation);
- a hash split would not buy finer caching: every partition's stage key hashes the collect stage's key,
  so any change to the samples rebuilds every partition either way.

A partition's name in the stage store is its label, ``p<i>of<P>`` (``curate/download-p0of3``).
"""

from __future__ import annotations

import re

_LABEL = re.compile(r"^p(\d+)of(\d+)$")


def partition_bounds(n: int, index: int, count: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of partition ``index`` (0-based) of ``count`` over ``n`` rows."""
    if count < 1:
        raise ValueError(f"partition count must be >= 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"partition index {index} is outside 0..{count - 1}")
    if n < 0:
        raise ValueError(f"row count must be >= 0, got {n}")
    return index * n // count, (index + 1) * n // count


def partition_label(index: int, count: int) -> str:
    """``p<index>of<count>``: the stage-name suffix of one partition's stages."""
    partition_bounds(0, index, count)  # validates
    return f"p{index}of{count}"


def partition_labels(count: int) -> list[str]:
    """Every partition's label, in index order."""
    return [partition_label(i, count) for i in range(count)]


def parse_partition_label(label: str) -> tuple[int, int]:
    """``"p1of3"`` -> ``(1, 3)``; anything else fails naming the expected form."""
    m = _LABEL.match(label or "")
    if m is None:
        raise ValueError(f"not a partition label: {label!r}; expected 'p<index>of<count>', e.g. 'p0of3'")
    index, count = int(m.group(1)), int(m.group(2))
    partition_bounds(0, index, count)
    return index, count
