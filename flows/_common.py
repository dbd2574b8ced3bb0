"""Small pieces every flow shares: where the stage store lives, the inline run's environment."""

from __future__ import annotations

import os
from pathlib import Path

# Flow runs log what matters; library load bars and deprecation chatter would drown it.
QUIET_LIBRARIES = {"DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error",
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def quiet_library_environment() -> None:
    """Quiet defaults for diffusers, transformers, the hub and tokenizers (a variable already set wins).

    Every flow calls it first, before any stage imports those libraries (they read the variables at import);
    training and evaluation subprocesses inherit the variables.
    """
    for var, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(var, value)


# An inline run (``python -m flows.<flow>``) starts its own temporary Prefect server; on a busy machine its
# first start (a new SQLite database, migrations) takes longer than Prefect's default of 20 s.
EPHEMERAL_STARTUP_TIMEOUT_S = 180


def inline_run_environment() -> None:
    """Defaults for an inline run: offline, no telemetry, a patient temporary Prefect server.

    Call it before Prefect is imported: Prefect reads its settings and the SDK's telemetry switch from
    the environment at import. The temporary server and the training subprocesses inherit the variables.
    A variable already set wins; models download only with ``SD_DISTILL_ALLOW_DOWNLOAD=1``.
    """
    quiet_library_environment()
    defaults = {
        "DO_NOT_TRACK": "1",  # Prefect's SDK telemetry
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the server's startup telemetry
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(EPHEMERAL_STARTUP_TIMEOUT_S),
        "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations' version check at import
    }
    if os.environ.get("SD_DISTILL_ALLOW_DOWNLOAD", "0") != "1":
        defaults["HF_HUB_OFFLINE"] = "1"
    for var, value in defaults.items():
        os.environ.setdefault(var, value)


def default_store_root() -> str:
    """``$SD_DISTILL_STORE`` (any fsspec URL) or ``./runs/store``."""
    return os.environ.get("SD_DISTILL_STORE", "runs/store")


def resolve_store_root(store_root: str | None) -> str:
    root = store_root or default_store_root()
    if "://" in root:
        return root
    return str(Path(root).expanduser().resolve())


def curated_manifest(curated: str, store_root: str):
    """A curated stage's manifest from a stage folder / URL, or ``latest`` (newest curate/shards in the store)."""
    from sd_distill.store import StageStore, load_manifest

    if curated == "latest":
        found = StageStore(store_root).manifests("curate/shards")
        if not found:
            raise FileNotFoundError(f"no curated dataset in {store_root}/curate/shards: run the curate flow first "
                                    "or pass curated=<stage folder>")
        return found[-1]
    manifest = load_manifest(curated)
    if manifest.stage != "curate/shards":
        raise ValueError(f"{curated} is a {manifest.stage!r} stage, not curated shards (curate/shards)")
    return manifest
