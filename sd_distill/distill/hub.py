"""Optional upload of an exported student to the Hugging Face hub (off by default; the tests never run it).

``HubParams`` is the run file's ``push_to_hub`` block. ``check_push_ready`` fails before anything runs when the
upload could not happen (no token in the named variable, the hub switched off with ``HF_HUB_OFFLINE``);
``upload_plan`` lists what would be uploaded (every file of the student folder, ``README.md`` replaced by the
completed card of the evaluate report when there is one); ``push_student`` uploads it in one commit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sd_distill.distill.card import CARD_FILE


class HubParams(BaseModel):
    """Where the student goes on the hub; nothing is uploaded unless ``enabled``."""

    model_config = ConfigDict(extra="forbid")

    # Off by default: a run never publishes anything unless asked to.
    enabled: bool = False
    # The model repository, "<user or organisation>/<name>"; required when enabled.
    repo_id: Optional[str] = Field(default=None, pattern=r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
    # New repositories are private: publishing is a decision to make on the hub, after looking at the card.
    private: bool = True
    # The environment variable holding a write token (the hub's own default name).
    token_env: str = "HF_TOKEN"
    # The branch to commit to; None = the repository's default branch.
    revision: Optional[str] = None
    # The commit message; None = "curate-and-distill: <student stage folder>".
    commit_message: Optional[str] = None

    @model_validator(mode="after")
    def _needs_repo(self) -> "HubParams":
        if self.enabled and not self.repo_id:
            raise ValueError("push_to_hub.enabled needs push_to_hub.repo_id ('<user or organisation>/<name>')")
        return self


def check_push_ready(params: HubParams) -> None:
    """Raise, naming what to set, when an enabled upload could not run; a no-op when disabled."""
    if not params.enabled:
        return
    if not os.environ.get(params.token_env):
        raise ValueError(f"push_to_hub is enabled but ${params.token_env} is not set; put a hub write token in it "
                         "or set push_to_hub.token_env to the variable that holds one")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ValueError("push_to_hub is enabled but HF_HUB_OFFLINE is set (inline runs set it unless "
                         "SD_DISTILL_ALLOW_DOWNLOAD=1); unset it or set SD_DISTILL_ALLOW_DOWNLOAD=1")


def upload_plan(folder: str | Path, card: str | Path | None = None) -> list[tuple[str, Path]]:
    """(path in the repository, local file) of every file to upload, sorted; ``card`` replaces ``README.md``."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"}
    if card is not None and Path(card).is_file():
        files[CARD_FILE] = Path(card)
    if CARD_FILE not in files:
        raise FileNotFoundError(f"{folder} has no {CARD_FILE} (model card) and none was given; export the student again")
    return sorted(files.items())


def push_student(folder: str | Path, params: HubParams, card: str | Path | None = None) -> str:
    """Upload the student folder (with ``card`` as its README.md) to ``params.repo_id`` in one commit; returns the
    commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi  # deferred: heavy (huggingface_hub)

    check_push_ready(params)
    if not params.enabled:
        raise ValueError("push_to_hub is not enabled")
    api = HfApi(token=os.environ[params.token_env])
    api.create_repo(params.repo_id, repo_type="model", private=params.private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in upload_plan(folder, card)]
    info = api.create_commit(params.repo_id, operations=operations, repo_type="model", revision=params.revision,
                             commit_message=params.commit_message or f"curate-and-distill: {Path(folder).name}")
    return info.commit_url
