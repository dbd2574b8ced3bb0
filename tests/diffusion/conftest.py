"""Fixtures of the tests under tests/diffusion/ (defined in the shared tests/_fixtures_*.py modules)."""

from tests._fixtures_methods import load_tiny_teacher, single_thread, teacher_root  # noqa: F401 - fixtures
