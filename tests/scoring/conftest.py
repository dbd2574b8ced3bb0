"""Fixtures of the tests under tests/scoring/ (defined in the shared tests/_fixtures_*.py modules)."""

from tests._fixtures_scoring import tiny_clip_dir  # noqa: F401 - fixtures
