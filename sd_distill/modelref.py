"""Model references: a hub repo id, a local folder, or ``toy:<name>`` for the shipped toy models.

Nothing is downloaded unless the user allows it: hub ids are resolved with
``local_files_only=True`` unless ``allow_download`` is set (or ``SD_DISTILL_ALLOW_DOWNLOAD=1``).
"""

from __future__ import annotations

import os
from pathlib import Path

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
        from sd_distill.store import load_manifest

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
