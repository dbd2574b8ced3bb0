"""Fixtures of the tests under tests/captioning/ (defined in the shared tests/_fixtures_*.py modules)."""

from tests._fixtures_scoring import tiny_blip_dir  # noqa: F401 - fixtures
