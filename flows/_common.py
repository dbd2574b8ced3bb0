"""Small pieces every flow shares: where the stage store lives."""

from __future__ import annotations

import os
from pathlib import Path


def default_store_root() -> str:
    """``$SD_DISTILL_STORE`` (any fsspec URL) or ``./runs/store``."""
    return os.environ.get("SD_DISTILL_STORE", "runs/store")


def resolve_store_root(store_root: str | None) -> str:
    root = store_root or default_store_root()
    if "://" in root:
        return root
    return str(Path(root).expanduser().resolve())
