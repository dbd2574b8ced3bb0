"""The phase CLI as the Prefect task runs it: a subprocess streaming JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests._fixtures_distill import tiny_params


def _run(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sd_distill.distill.train", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def _events(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_cli_trains_a_phase_and_streams_progress_as_json_lines(tiny_teacher, tiny_cache, tmp_path):
    params = tmp_path / "params.json"
    params.write_text(tiny_params(tiny_teacher, max_steps=3).model_dump_json())
    args = ["--params", str(params), "--phase", "0", "--cache", str(tiny_cache), "--out", str(tmp_path / "p")]
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = _events(proc.stdout)
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3]
    assert events[-1]["event"] == "done" and events[-1]["steps"] == 3
    assert (tmp_path / "p" / "unet" / "config.json").exists()


def test_cli_resume_flag_continues_from_the_newest_checkpoint(tiny_teacher, tiny_cache, tmp_path, capsys):
    from sd_distill.distill.train import main

    params = tmp_path / "params.json"
    params.write_text(tiny_params(tiny_teacher, max_steps=3, checkpoint_every=2).model_dump_json())
    args = ["--params", str(params), "--phase", "0", "--cache", str(tiny_cache), "--out", str(tmp_path / "p")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    done = _events(capsys.readouterr().out)[-1]
    assert done["event"] == "done" and done["steps_this_run"] == 0 and done["resumed_from"].endswith("step-0000003")


@pytest.mark.slow
def test_cli_rejects_a_phase_index_the_method_does_not_have(tiny_teacher, tiny_cache, tmp_path):
    params = tmp_path / "params.json"
    params.write_text(tiny_params(tiny_teacher).model_dump_json())
    proc = _run(["--params", str(params), "--phase", "3", "--cache", str(tiny_cache), "--out", str(tmp_path / "p")], tmp_path)
    assert proc.returncode == 2
    assert "out of range" in _events(proc.stdout)[-1]["error"] and "cfg-aware-4-2" in proc.stderr
