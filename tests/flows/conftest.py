"""Fixtures of the tests under tests/flows/ (defined in the shared tests/_fixtures_*.py modules)."""

from tests._fixtures_distill import tiny_cache, tiny_curated, tiny_teacher  # noqa: F401 - fixtures
