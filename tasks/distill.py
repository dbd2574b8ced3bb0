"""Prefect tasks of the distill stage: latent cache, one task per training phase, export."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from prefect import task

from sd_distill.distill import card, data, export, hub
from sd_distill.distill.methods import plan_phases
from sd_distill.evaluate.cards import CARDS_DIR
from sd_distill.modelref import model_fingerprint
from tasks._artifacts import publish_image, publish_markdown
from tasks._stage import stage_task, work_dir
from tasks._subprocess import run_streaming


def _cache_key(p):
    # the fingerprint: a teacher folder whose weights changed in place must not reuse the old cache
    return {"teacher": p.teacher, "teacher_fingerprint": model_fingerprint(p.teacher), "data": p.data}


@stage_task("distill/cache", key_of=_cache_key, description="distill: encoding latents and prompts")
def build_latent_cache(params, upstream, store_root):
    """VAE latents + text embeddings of the curated shards, computed once."""
    return lambda out, inputs, progress: data.cache_latents(params, inputs[0], out, progress)


def launcher(num_processes: int) -> list[str]:
    """``python -m`` for one process; ``accelerate launch --multi_gpu`` for several.

    ``--multi_gpu`` is accelerate's switch for a distributed (torchrun) launch; without it, a machine
    with no GPU silently runs one process. On CPUs the processes train with gloo (``trainer.device: cpu``).
    """
    if num_processes <= 1:
        return [sys.executable, "-m"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes), "-m"]


@stage_task("distill/phase", retries=1, description="distill: training")
def train_phase(params, upstream, store_root, suffix):
    """Train one phase in a subprocess (``accelerate launch`` on GPUs), resuming from its last checkpoint."""
    phases = {p.name: p for p in plan_phases(params.method)}
    phase = phases[suffix]

    def fn(out: Path, inputs: list[Path], progress) -> dict:
        work = work_dir()  # checkpoints here survive a failed attempt; a retry resumes from them
        params_file = work / "params.json"
        params_file.write_text(params.model_dump_json())
        cmd = launcher(params.trainer.num_processes) + [
            "sd_distill.distill.train", "--params", str(params_file), "--phase", str(phase.index),
            "--cache", str(inputs[0]), "--out", str(work / "phase"), "--resume",
        ]
        if len(inputs) > 1:
            cmd += ["--previous", str(inputs[1])]
        events = run_streaming(cmd, progress)
        for item in (work / "phase").iterdir():
            if item.name != "checkpoints":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
        done = next((e for e in reversed(events) if e.get("event") == "done"), {})
        shutil.rmtree(work, ignore_errors=True)
        return {k: v for k, v in done.items() if k != "event" and isinstance(v, (int, float, str))}

    return fn


# code_version 2: the folder holds the model card (README.md)
@stage_task("distill/student", key_of=lambda p: p, code_version="2", description="distill: exporting the student")
def export_student(params, upstream, store_root):
    """The last phase's student as a stock diffusers pipeline folder, with config, loss curve and model card.

    upstream: [curated shards, latent cache, phases...]."""
    data_summary = card.training_data(upstream[0])

    def fn(out, inputs, progress):
        summary = export.export_student(params, inputs[2:], out, progress, data=data_summary)
        # paths inside the (temporary) stage folder are meaningless once it is renamed into place
        return {k: v for k, v in summary.items() if not (isinstance(v, str) and str(out) in v)}

    return fn


@task(name="push-student-to-hub", retries=2, retry_delay_seconds=10)
def push_student_to_hub(student, report, params) -> str:
    """Upload the student folder with the report's completed model card (its export card when there is none)."""
    card_file = report.path / CARDS_DIR / "student" / card.CARD_FILE
    return hub.push_student(student.path, params, card_file if card_file.is_file() else None)


def publish_student(manifest) -> None:
    folder = manifest.path
    publish_image(folder / "loss_curve.png", "distill-loss-curve", "distillation loss per step, all phases")
    config = json.loads((folder / "distill_config.json").read_text()) if (folder / "distill_config.json").exists() else {}
    pipeline = config.get("pipeline", "StableDiffusionPipeline")
    lines = [f"**Student pipeline:** `{folder}`", "", f"Load it with `{pipeline}.from_pretrained(path)`.", ""]
    for key in ("method", "prediction_type", "student_steps", "w_conditioned", "sampling"):
        if key in config:
            lines.append(f"- {key}: `{json.dumps(config[key])[:300]}`")
    publish_markdown("\n".join(lines), "distill-student", "the distilled student")
