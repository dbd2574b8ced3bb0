"""Model references: a hub repo id, a local folder, or ``toy:<name>`` for the shipped toy models.

Nothing is downloaded unless the user allows it: hub ids are resolved with
``local_files_only=True`` unless ``allow_download`` is set (or ``SD_DISTILL_ALLOW_DOWNLOAD=1``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sd_distill.store import load_manifest

TOY_ASSETS = Path(__file__).parent / "toy" / "assets"


def allow_download() -> bool:
    return os.environ.get("SD_DISTILL_ALLOW_DOWNLOAD", "0") == "1"


def resolve_model_ref(ref: str) -> str:
    """A local folder path for ``toy:<name>``, existing folders and stage folders in a remote store
    (``s3://.../distill/student/<key>``: copied once into the stage cache); hub ids are returned unchanged."""
    if ref.startswith("toy:"):
        path = TOY_ASSETS / ref[len("toy:"):]
        if not path.exists():
            known = sorted(p.name for p in TOY_ASSETS.iterdir()) if TOY_ASSETS.exists() else []
            raise FileNotFoundError(f"toy model {ref!r} is not shipped; known toy models: {known}")
        return str(path)
    if "://" in ref and not ref.startswith("file://"):
        return str(load_manifest(ref).path)
    p = Path(ref.removeprefix("file://")).expanduser()
    if p.exists():
        return str(p.resolve())
    if ref.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {ref!r} does not exist")
    return ref  # a hub id


def hub_kwargs() -> dict:
    """Keyword arguments for from_pretrained: offline unless downloads are allowed."""
    return {} if allow_download() else {"local_files_only": True}


def model_fingerprint(ref: str, sample_bytes: int = 1 << 20) -> str:
    """A content fingerprint of a model reference, for stage keys (16 hex chars).

    For a local folder (and ``toy:<name>``) it hashes every file's relative path, size and first and last
    ``sample_bytes``: retrained or replaced weights give a new fingerprint, while hashing whole multi-GB
    checkpoints on every key computation is avoided. Hub ids (pin them with a revision in the id or
    the hub cache) and stage-store URLs (content-addressed already) are their own fingerprint.
    """
    if "://" in ref and not ref.startswith("file://"):
        return hashlib.sha256(ref.encode()).hexdigest()[:16]
    try:
        resolved = Path(resolve_model_ref(ref))
    except FileNotFoundError:  # the stage that loads it reports the missing folder clearly
        resolved = Path(ref)
    if not resolved.exists():
        return hashlib.sha256(ref.encode()).hexdigest()[:16]
    base = resolved if resolved.is_dir() else resolved.parent
    files = sorted(p for p in resolved.rglob("*") if p.is_file()) if resolved.is_dir() else [resolved]
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(base)
        if any(part.startswith(".") for part in rel.parts):
            continue
        size = f.stat().st_size
        h.update(f"{rel.as_posix()}:{size}".encode())
        with open(f, "rb") as handle:
            h.update(handle.read(sample_bytes))
            if size > 2 * sample_bytes:
                handle.seek(-sample_bytes, os.SEEK_END)
                h.update(handle.read(sample_bytes))
    return h.hexdigest()[:16]
