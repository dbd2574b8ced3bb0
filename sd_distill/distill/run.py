"""The whole distill stage in one call (notebooks, scripts): cache -> every phase -> export.

It calls the same functions the Prefect layer calls one by one (``cache_latents``, ``train_phase`` per
phase, ``export_student``), laid out in one folder::

    out_dir/cache/            latent + text-embedding cache
    out_dir/phase-00-<name>/  each phase's student, checkpoints, loss curve
    out_dir/student/          the exported diffusers pipeline (+ distill_config.json, loss_curve.csv/.png)

Example::

    from sd_distill.distill.config import DistillParams
    from sd_distill.distill.run import distill
    distill(DistillParams(), "runs/curated", "runs/distill")
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from sd_distill.distill.data import cache_index, cache_latents
from sd_distill.distill.export import export_student
from sd_distill.distill.methods import phase_params, plan_phases
from sd_distill.distill.trainer import train_phase
from sd_distill.progress import ProgressFn


def phase_folder_name(phase) -> str:
    return f"phase-{phase.index:02d}-{phase.name}"


def distill(params, curated_dir: str | Path, out_dir: str | Path, progress: Optional[ProgressFn] = None,
            resume: bool = True) -> dict:
    """Run cache, all phases of ``params.method`` and the export into ``out_dir``; returns their summaries."""
    out_dir = Path(out_dir)
    cache_dir = out_dir / "cache"
    try:
        cache_index(cache_dir)
        cache = {"reused": str(cache_dir)}
    except (FileNotFoundError, ValueError):
        cache = cache_latents(params, curated_dir, cache_dir, progress)
    phases = plan_phases(params.method)
    summaries, dirs, previous = [], [], None
    for phase in phases:
        phase_dir = out_dir / phase_folder_name(phase)
        # a progressive chain: the previous phase's student is this phase's teacher and initial student
        summaries.append(train_phase(phase_params(params, phase), phase, cache_dir, phase_dir, teacher_unet_ref=previous,
                                     student_init_ref=previous, progress=progress, resume=resume))
        dirs.append(phase_dir)
        previous = phase_dir
    exported = export_student(params, dirs, out_dir / "student", progress)
    return {"cache": cache, "phases": summaries, "export": exported}
