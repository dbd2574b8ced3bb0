"""The stage task mechanism: Prefect's cache key is the stage-store key."""

import shutil

import pytest
from prefect import flow
from pydantic import BaseModel

from tasks._stage import stage_task

pytestmark = pytest.mark.usefixtures("prefect_harness")

CALLS: list[int] = []


class Params(BaseModel):
    n: int = 3


@stage_task("unit/write")
def write_stage(params, upstream, store_root):
    def fn(out_dir, inputs, progress):
        CALLS.append(params.n)
        (out_dir / "data.txt").write_text("x" * params.n)
        for i in range(params.n):
            progress(i + 1, params.n, f"item {i}")
        return {"written": params.n}

    return fn


@stage_task("unit/read")
def read_stage(params, upstream, store_root):
    def fn(out_dir, inputs, progress):
        CALLS.append(-1)
        text = (inputs[0] / "data.txt").read_text()
        (out_dir / "len.txt").write_text(str(len(text)))
        return {"length": len(text)}

    return fn


@flow
def two_stages(params: Params, store_root: str):
    first = write_stage(params, [], store_root)
    return read_stage(params, [first], store_root)


def _task_states(flow_state):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return sorted(r.state.name for r in runs)


def test_second_identical_run_is_cached_and_does_no_work(tmp_path):
    CALLS.clear()
    s1 = two_stages(Params(n=4), str(tmp_path), return_state=True)
    manifest = s1.result()
    assert manifest.counts == {"length": 4}
    assert CALLS == [4, -1]
    s2 = two_stages(Params(n=4), str(tmp_path), return_state=True)
    assert CALLS == [4, -1], "an identical rerun must not recompute any stage"
    assert _task_states(s2) == ["Cached", "Cached"]
    assert s2.result().key == manifest.key


def test_changed_parameters_build_a_new_stage(tmp_path):
    CALLS.clear()
    a = two_stages(Params(n=2), str(tmp_path))
    b = two_stages(Params(n=5), str(tmp_path))
    assert a.key != b.key and CALLS == [2, -1, 5, -1]


def test_deleted_stage_folder_is_rebuilt_not_served_stale(tmp_path):
    CALLS.clear()
    m = two_stages(Params(n=3), str(tmp_path))
    shutil.rmtree(tmp_path / "unit" / "read")
    m2 = two_stages(Params(n=3), str(tmp_path))
    assert CALLS == [3, -1, -1], "only the deleted stage reruns"
    assert (m2.path / "len.txt").read_text() == "3" and m2.path == m.path
