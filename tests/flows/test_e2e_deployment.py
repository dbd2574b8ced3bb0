"""The DAG as users run it: a real Prefect server and process worker, deployments from deploy/prefect.yaml,
`prefect deployment run`, a failure in distill and `prefect flow-run retry`, two identical runs at once,
and the UI in headless Chromium. Everything on 127.0.0.1; server and worker stopped by PID."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests._prefect_server import REPO, prefect_cli, prefect_server, prefect_worker

pytestmark = pytest.mark.slow

POOL = "e2e-pool"
# The embedded toy world, small: 24 scenes, 4 training steps, 8 held-out prompts.
SMALL = {
    "curate": {"sources": [{"kind": "toy", "toy_n": 24}]},
    "distill": {"trainer": {"max_steps": 4, "checkpoint_every": 2}},
    "toy_eval_prompts": 8,
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Server + pool + deployments + worker; yields (env, ui_url, fault_dir)."""
    home = tmp_path_factory.mktemp("prefect-home")
    fault_dir = tmp_path_factory.mktemp("faults")
    with prefect_server(home) as (api_url, ui_url, env):
        env.update(CAD_CODE_DIR=str(REPO), CAD_CPU_POOL=POOL, CAD_GPU_POOL=POOL, CAD_FAULT_DIR=str(fault_dir))
        prefect_cli(env, "work-pool", "create", POOL, "--type", "process")
        out = prefect_cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
        assert "curate-and-distill/demo" in out
        with prefect_worker(env, POOL, home / "worker.log"):
            yield env, ui_url, fault_dir, api_url
        print((home / "worker.log").read_text()[-3000:])


def _client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Ctx:
        def __enter__(self):
            self.settings = temporary_settings({PREFECT_API_URL: api_url})
            self.settings.__enter__()
            self.client = get_client(sync_client=True)
            return self.client.__enter__()

        def __exit__(self, *exc):
            self.client.__exit__(*exc)
            self.settings.__exit__(*exc)

    return _Ctx()


def _start(env, name: str, params: dict) -> str:
    out = prefect_cli(env, "deployment", "run", name, "--params", json.dumps(params))
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out
    return match.group(1)


def _wait(api_url: str, run_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    with _client(api_url) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                return state.type.value
            time.sleep(0.5)
    raise TimeoutError(f"flow run {run_id} did not finish in {timeout}s")


def _task_states(api_url: str, run_id: str) -> dict[str, list[str]]:
    """Task name -> states of every task run under this flow run and its subflows."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with _client(api_url) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
        )
        ids = [run_id] + [c.id for c in children]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    states: dict[str, list[str]] = {}
    for r in runs:
        states.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
    return states


@pytest.mark.browser
def test_failed_distill_then_retry_resumes_without_redoing_curate(cluster, tmp_path):
    """A fault in the first distill phase fails the run after curate; `prefect flow-run retry` completes it
    and the curated shards are the ones built before the failure (not recomputed); the UI then shows the run
    and its artifacts (headless Chromium: deselect with ``-m "not browser"`` where none is installed)."""
    env, ui_url, fault_dir, api_url = cluster
    store = tmp_path / "store"
    (fault_dir / "distill-phase-cfg-aware-16-8").touch()
    run_id = _start(env, "curate-and-distill/demo", {**SMALL, "store_root": str(store)})
    assert _wait(api_url, run_id) == "FAILED"
    assert not (fault_dir / "distill-phase-cfg-aware-16-8").exists(), "the injected fault fired"
    shards = list((store / "curate" / "shards").iterdir())
    assert len(shards) == 1 and (shards[0] / "manifest.json").exists()
    before = (shards[0] / "manifest.json").stat().st_mtime_ns
    assert not (store / "distill" / "student").exists()

    out = prefect_cli(env, "flow-run", "retry", run_id)
    assert "scheduled for retry" in out
    assert _wait(api_url, run_id) == "COMPLETED"
    assert (shards[0] / "manifest.json").stat().st_mtime_ns == before, "curate was not recomputed"
    assert [p.name for p in (store / "curate" / "shards").iterdir()] == [shards[0].name]
    summary = (store / "latest-summary.md").read_text()
    assert "| teacher | teacher | 8 |" in summary and "| student | student | 8 |" in summary
    from huggingface_hub import ModelCard  # the demo's student folder and its report carry a hub model card

    from sd_distill.distill.card import NOT_EVALUATED

    (student_dir,) = [p for p in (store / "distill" / "student").iterdir() if (p / "manifest.json").exists()]
    assert ModelCard.load(student_dir / "README.md").data.pipeline_tag == "text-to-image"
    (report_card,) = (store / "evaluate" / "report").glob("*/cards/student/README.md")
    assert NOT_EVALUATED not in ModelCard.load(report_card).text
    states = _task_states(api_url, run_id)
    assert any(s in ("Cached", "Completed") for s in states.get("curate-shards", [])), states

    with _client(api_url) as client:
        keys = {a.key for a in client.read_artifacts()}
    for key in ("run-summary", "curate-counts", "distill-loss-curve", "evaluate-results", "evaluate-metrics-vs-steps"):
        assert key in keys, f"artifact {key} missing from {sorted(keys)}"
    cluster_ui_check(ui_url, run_id, keys)


def test_two_identical_runs_at_once_leave_one_intact_store(cluster, tmp_path):
    """Two identical curate deployment runs racing on one store: both complete, one folder per stage, intact."""
    from sd_distill.store import StageStore

    env, _, _, api_url = cluster
    store = tmp_path / "store"
    params = {"params": SMALL["curate"], "store_root": str(store)}
    ids = [_start(env, "curate/default", params) for _ in range(2)]
    assert [_wait(api_url, i) for i in ids] == ["COMPLETED", "COMPLETED"]
    st = StageStore(store)
    for stage in ("curate/sources", "curate/download", "curate/score", "curate/caption", "curate/shards"):
        found = st.manifests(stage)
        assert len(found) == 1, f"{stage}: {len(found)} folders"
        assert st.verify(found[0]) == [], f"{stage} is corrupted"
        leftovers = [p.name for p in (store / stage).iterdir() if ".tmp-" in p.name]
        assert leftovers == [], f"{stage}: temporary folders left behind {leftovers}"


def cluster_ui_check(ui_url: str, run_id: str, artifact_keys: set[str]) -> None:
    """Headless Chromium opens the flow run's page in the UI, sees it completed with its artifacts."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("no chromium on PATH: install Debian's chromium (.ci/run does) or deselect with -m 'not browser'")
    from playwright.sync_api import sync_playwright

    shots = REPO / "runs" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{ui_url}/runs/flow-run/{run_id}", wait_until="networkidle")
        page.get_by_text("curate-and-distill").first.wait_for(timeout=30000)
        page.get_by_text("Completed").first.wait_for(timeout=30000)
        page.screenshot(path=str(shots / "flow-run.png"), full_page=True)
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("run-summary").first.wait_for(timeout=30000)
        page.screenshot(path=str(shots / "flow-run-artifacts.png"), full_page=True)
        # the teacher-vs-student grid, as the Artifacts page shows it
        grids = sorted(k for k in artifact_keys if k and k.startswith("evaluate-grid-"))
        page.goto(f"{ui_url}/artifacts/key/{grids[0]}", wait_until="networkidle")
        page.locator("a[href*='/artifacts/artifact/']").first.click()
        page.locator("img[src^='data:image/png']").first.wait_for(timeout=30000)
        page.screenshot(path=str(shots / "evaluate-grid.png"), full_page=True)
        browser.close()
    assert (shots / "evaluate-grid.png").stat().st_size > 10_000


def test_parent_runs_distill_as_its_own_deployment(cluster, tmp_path):
    """With stage_deployments.distill = "distill/gpu" the parent starts that deployment (run_deployment),
    waits for it, and continues with the student it returned."""
    env, _, _, api_url = cluster
    store = tmp_path / "store"
    run_id = _start(env, "curate-and-distill/demo",
                    {**SMALL, "store_root": str(store), "stage_deployments": {"distill": "distill/gpu"}})
    assert _wait(api_url, run_id) == "COMPLETED"
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with _client(api_url) as client:
        gpu_runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"])))
    distill_runs = [r for r in gpu_runs if str(r.parameters.get("store_root")) == str(store)]
    assert len(distill_runs) == 1 and distill_runs[0].state.is_completed()
    assert "| student | student | 8 |" in (store / "latest-summary.md").read_text()
