"""The distilled student as a diffusers pipeline folder that a stock ``StableDiffusionPipeline`` loads
(``StableDiffusionXLPipeline`` for an SDXL teacher).

``export_student`` writes into ``out_dir``:

- the pipeline: the teacher's VAE, text encoder(s), tokenizer(s) (and safety checker / feature extractor when it
  has them; SDXL: the second encoder and tokenizer and ``force_zeros_for_empty_prompt``), the last phase's student
  UNet and a ``DDIMScheduler`` built from the teacher's scheduler config with the timestep spacing the student was
  trained on (any diffusers scheduler, e.g. ``DPMSolverMultistepScheduler``, loads from it with ``from_config``);
- ``distill_config.json``: parameters, phases, prediction type, guidance convention, how to sample the student;
- ``loss_curve.csv`` / ``loss_curve.png``: every phase's per-step losses on one global step axis;
- ``README.md``: the model card in the hub's format (``card.py``), its evaluation section still open.

Guidance convention (docs/design.md, "Diffusion math and guidance"): ``guidance_scale`` is the diffusers/LCM scale s of
``eps_u + s (eps_c - eps_u)`` for teacher and student alike. A w-conditioned student (``time_cond_proj_dim`` set)
is sampled by the stock pipeline in one pass per step with the guidance embedding of ``s - 1`` (Imagen's w), and
was trained on exactly that embedding, so ``guidance_scale=7.5`` means the same for it as for the teacher.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence

from sd_distill.diffusion.schedule import latent_ddim_scheduler
from sd_distill.distill.card import write_model_card
from sd_distill.distill.teacher import check_teacher_folder, is_sdxl_index
from sd_distill.modelref import hub_kwargs, resolve_model_ref
from sd_distill.progress import ProgressFn, report

STUDENT_FORMAT = "sd_distill.student/1"
GUIDANCE_CONVENTION = (
    "diffusers/LCM form: pred = pred_uncond + s * (pred_cond - pred_uncond), s = guidance_scale. "
    "w-conditioned students get the embedding of w = s - 1 (Imagen's (1 + w) c - w u == the diffusers form "
    "with s = 1 + w), which is what StableDiffusionPipeline feeds when unet.config.time_cond_proj_dim is set, "
    "so guidance_scale means the same for the student as for the teacher."
)


def read_phase(phase_dir: str | Path) -> dict:
    """A finished phase folder's summary (phase.json); a clear error when the phase did not finish."""
    path = Path(phase_dir) / "phase.json"
    if not path.exists() or not (Path(phase_dir) / "unet" / "config.json").exists():
        raise FileNotFoundError(f"{phase_dir} is not a finished distillation phase (needs phase.json and unet/)")
    return json.loads(path.read_text())


def merged_loss_curve(phase_dirs: Sequence[str | Path]) -> list[dict]:
    """All phases' loss_curve.csv rows with ``phase``, ``phase_name`` and a running ``global_step``."""
    rows, offset = [], 0
    for d in phase_dirs:
        info = read_phase(d)["phase"]
        with open(Path(d) / "loss_curve.csv", newline="") as f:
            part = list(csv.DictReader(f))
        for r in part:
            rows.append({"phase": info["index"], "phase_name": info["name"], "global_step": offset + int(r["step"]), **r})
        offset += len(part)
    return rows


def write_loss_plot(rows: list[dict], path: Path) -> Path:
    """loss vs global step, one colour per phase, log scale when every loss is positive."""
    import matplotlib  # deferred: heavy (matplotlib)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: heavy (matplotlib)

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    names = list(dict.fromkeys(r["phase_name"] for r in rows))
    losses = [float(r["loss"]) for r in rows]
    for name in names:
        sel = [r for r in rows if r["phase_name"] == name]
        ax.plot([int(r["global_step"]) for r in sel], [float(r["loss"]) for r in sel], label=name, lw=1)
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step (all phases)")
    ax.set_ylabel("distillation loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def trained_guidance_range(method) -> tuple[float, float] | None:
    """The guidance scales s (diffusers form) the student was trained on: [guidance_min, guidance_max] for the step
    methods, which sample s from it; None for bksdm_kd, which trains on the unguided output and, like its teacher,
    takes any guidance at sampling time."""
    if method.kind == "bksdm_kd":
        return None
    return float(method.guidance_min), float(method.guidance_max)


def example_guidance(guidance_range: tuple[float, float] | None) -> float | None:
    """A guidance scale to show with the student: the middle of its trained range (None: the teacher's usual)."""
    return None if guidance_range is None else round((guidance_range[0] + guidance_range[1]) / 2, 2)


def student_guidance_range(folder: str | Path) -> tuple[float, float] | None:
    """The trained guidance range a student folder's ``distill_config.json`` records (None: no file, a model that
    is not a distilled student, or one trained without a range)."""
    path = Path(folder) / "distill_config.json"
    if not path.exists():
        return None
    value = json.loads(path.read_text()).get("guidance_range")
    return (float(value[0]), float(value[1])) if value else None


def export_student(params, phase_dirs: Sequence[str | Path], out_dir: str | Path,
                   progress: Optional[ProgressFn] = None, data: Optional[dict] = None) -> dict:
    """Write the last phase's student as a stock diffusers pipeline folder (see module docstring).

    ``data``: the training data's summary for the model card (``card.data_summary`` of the curate manifests)."""
    from diffusers import (  # deferred: heavy (diffusers)
        DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)

    if not phase_dirs:
        raise ValueError("export_student needs at least one finished phase folder")
    phases = [read_phase(d) for d in phase_dirs]
    last = phases[-1]
    out_dir = Path(out_dir)
    report(progress, 0, 3, "loading teacher components")
    teacher_ref = resolve_model_ref(params.teacher)
    student = UNet2DConditionModel.from_pretrained(str(Path(phase_dirs[-1]) / "unet"))
    teacher_sched = DDIMScheduler.from_pretrained(teacher_ref, subfolder="scheduler", **hub_kwargs())
    spacing = last.get("timestep_spacing") or teacher_sched.config.get("timestep_spacing", "leading")
    scheduler = latent_ddim_scheduler(teacher_sched.config, timestep_spacing=spacing)
    sdxl = is_sdxl_index(check_teacher_folder(teacher_ref)) or student.config.get("addition_embed_type") == "text_time"
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = pipeline_class.from_pretrained(teacher_ref, unet=student, scheduler=scheduler, **hub_kwargs())
    report(progress, 1, 3, "saving pipeline")
    pipe.save_pretrained(str(out_dir), safe_serialization=True)

    w_conditioned = student.config.get("time_cond_proj_dim") is not None
    steps = last["phase"]["student_steps"]
    guidance_range = trained_guidance_range(params.method)
    config = {
        "format": STUDENT_FORMAT,
        "teacher": params.teacher,
        "params": params.model_dump(mode="json"),
        "phases": phases,
        "pipeline": pipeline_class.__name__,
        "prediction_type": scheduler.config.prediction_type,
        "student_steps": steps,
        "student_arch": params.method.student_arch,
        "w_conditioned": w_conditioned,
        "time_cond_proj_dim": student.config.get("time_cond_proj_dim"),
        "guidance_convention": GUIDANCE_CONVENTION,
        "sampling": {"scheduler": "DDIMScheduler", "timestep_spacing": spacing, "num_inference_steps": steps,
                     "eta": 0.0, "unet_evals_per_step": 1 if w_conditioned else 2,
                     "guidance_scale_example": example_guidance(guidance_range)},
        "guidance_range": list(guidance_range) if guidance_range else None,
    }
    (out_dir / "distill_config.json").write_text(json.dumps(config, indent=1))
    report(progress, 2, 3, "writing loss curve")
    rows = merged_loss_curve(phase_dirs)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out_dir / "loss_curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    write_loss_plot(rows, out_dir / "loss_curve.png")
    write_model_card(out_dir, data)
    report(progress, 3, 3, "exported")
    return {"student": str(out_dir), "phases": len(phases), "student_steps": steps, "w_conditioned": w_conditioned,
            "prediction_type": config["prediction_type"], "total_steps": len(rows),
            "final_loss": float(rows[-1]["loss"]) if rows else None}
