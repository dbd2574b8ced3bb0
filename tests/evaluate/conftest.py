"""Fixtures of the tests under tests/evaluate/ (defined in the shared tests/_fixtures_*.py modules)."""

from tests._fixtures_evaluate import coco_fixture, eval_root, fid_inception_weights, hpsv2_fixture, tiny_classifier_folder, tiny_clip_folder, tiny_student, tiny_teacher  # noqa: F401 - fixtures
