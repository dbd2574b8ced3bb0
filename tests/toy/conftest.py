"""Fixtures of the tests under tests/toy/ (defined in the shared tests/_fixtures_*.py modules)."""

from tests._fixtures_toy import toy_classifier  # noqa: F401 - fixtures
