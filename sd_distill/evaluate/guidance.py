"""Guidance at evaluation vs training: a distilled student learned the guidance scales of its training range
(``distill_config.json``'s ``guidance_range``); sampled outside it, its images are an extrapolation the table
should not present as like-for-like with the teacher's."""

from __future__ import annotations

from sd_distill.distill.export import student_guidance_range
from sd_distill.evaluate.config import ModelSpec
from sd_distill.modelref import resolve_model_ref


def guidance_outside_training(model: ModelSpec, guidance_scale: float) -> str | None:
    """A one-line note when ``guidance_scale`` lies outside the range ``model`` was distilled on, else None
    (teachers, hub ids and students trained without a range get None)."""
    try:
        folder = resolve_model_ref(model.ref)
    except (FileNotFoundError, ValueError):
        return None
    trained = student_guidance_range(folder)
    if trained is None or trained[0] <= guidance_scale <= trained[1]:
        return None
    return (f"{model.name} is evaluated at guidance_scale {guidance_scale:g}, outside the range it was distilled on "
            f"[{trained[0]:g}, {trained[1]:g}]: its rows extrapolate beyond what it learned")
