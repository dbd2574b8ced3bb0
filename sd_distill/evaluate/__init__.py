"""The evaluate stage: DPM-Solver++ sampling at 8 / 16 / 20 steps, FID / IS / CLIP / HPSv2, report.

Modules: ``config`` (EvaluateParams, ModelSpec), ``prompts`` (COCO captions, HPSv2 benchmark),
``generate`` (resumable, sharded image generation), ``metrics/`` (FID, IS, feature extractors, CLIP
and HPSv2), ``speed`` (latency, UNet evaluations, parameters, MACs), ``report`` (table, grids, plot),
``run`` (``evaluate`` and its step functions).
"""

from .config import EvaluateParams, ModelSpec, toy_evaluate_params
from .run import build_report, compute_metrics, evaluate, generate_images

__all__ = ["EvaluateParams", "ModelSpec", "toy_evaluate_params", "evaluate", "generate_images", "compute_metrics",
           "build_report"]
