"""Session-wide test set-up: offline, quiet, one real Prefect server for the whole session."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# One intra-op thread per process, inherited by every subprocess a test starts (Prefect worker, flow runs,
# img2dataset, training): make test runs two pytest workers on two cores, and tiny-model ops with two OpenMP
# threads each on an oversubscribed machine spend their time waiting for each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """A real Prefect server (SQLite, temporary) shared by every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def pytest_collection_modifyitems(config, items):
    """Files with slow (whole-stage, whole-DAG) tests run first, so that with two workers (``make test``) the
    longest files do not start last and leave one worker idle at the end. The order within a file is kept."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
