"""Pictures and tables for the Prefect UI."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect.artifacts import create_image_artifact, create_markdown_artifact


def publish_image(path: str | Path, key: str, description: str) -> None:
    """An image artifact (inline PNG data URL, so it shows without a file server) plus where the file is."""
    path = Path(path)
    if not path.is_file():
        return
    data = base64.b64encode(path.read_bytes()).decode()
    create_image_artifact(image_url=f"data:image/png;base64,{data}", key=key, description=f"{description} ({path})")


def publish_markdown(markdown: str, key: str, description: str) -> None:
    create_markdown_artifact(markdown=markdown, key=key, description=description)
