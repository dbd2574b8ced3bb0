"""Several training processes, launched exactly as the distill task launches them (``accelerate launch``).

On this GPU-less machine the processes run data-parallel on CPU (gloo); on a GPU node the same command
runs one process per GPU. Proves the launch really starts N processes, that the data-parallel run resumes
exactly, and that a process-count mismatch is refused instead of silently training on one process.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tasks.distill import launcher
from tests._fixtures_distill import tiny_params


def _launch(params, cache, out, world: int, resume: bool = False):
    params_file = out.parent / f"{out.name}-params.json"
    params_file.write_text(params.model_dump_json())
    cmd = launcher(world) + ["sd_distill.distill.train", "--params", str(params_file), "--phase", "0",
                             "--cache", str(cache), "--out", str(out)] + (["--resume"] if resume else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, events


def _weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_two_process_run_is_data_parallel_and_resumes_to_the_same_weights(tiny_teacher, tiny_cache, tmp_path):
    full = tiny_params(tiny_teacher, max_steps=4, checkpoint_every=2, num_processes=2)
    proc, events = _launch(full, tiny_cache, tmp_path / "full", world=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = events[-1]
    assert done["event"] == "done" and done["world_size"] == 2 and done["steps"] == 4
    # only the main process reports: one progress line per step, not two
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3, 4]

    cut = tiny_params(tiny_teacher, max_steps=2, checkpoint_every=2, num_processes=2)
    proc, _ = _launch(cut, tiny_cache, tmp_path / "cut", world=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, events = _launch(full, tiny_cache, tmp_path / "cut", world=2, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert events[-1]["resumed_from"].endswith("step-0000002") and events[-1]["steps_this_run"] == 2

    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=f"{name} differs after resume")
    start = load_file(str(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[n], start[n]) for n in a), "two-process training left the weights untouched"


@pytest.mark.slow
def test_process_count_mismatch_is_refused_with_the_launch_command(tiny_teacher, tiny_cache, tmp_path):
    params = tiny_params(tiny_teacher, max_steps=1, num_processes=2)
    proc, events = _launch(params, tiny_cache, tmp_path / "one", world=1)  # plain `python -m`: one process
    assert proc.returncode == 2
    assert "num_processes is 2 but 1 process(es)" in events[-1]["error"]
    assert "--multi_gpu --num_processes 2" in events[-1]["error"]
    assert not (tmp_path / "one" / "unet").exists()
