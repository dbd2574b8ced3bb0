"""Fixtures of the tests under tests/distill/methods/ (defined in the shared tests/_fixtures_*.py modules)."""

from tests._fixtures_evaluate import coco_fixture, eval_root, hpsv2_fixture, tiny_classifier_folder, tiny_clip_folder  # noqa: F401 - fixtures
from tests._fixtures_methods import load_tiny_teacher, single_thread, teacher_root  # noqa: F401 - fixtures
from tests._fixtures_sdxl import sdxl_root, sdxl_teachers  # noqa: F401 - fixtures
