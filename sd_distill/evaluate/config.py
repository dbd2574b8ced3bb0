"""Parameters of the evaluate stage (pydantic v2; they are Prefect flow parameters).

The defaults reproduce the reference protocol: 512 px images from DPM-Solver++ at 8, 16 and 20
steps with guidance 7.5, zero-shot on the first caption of each of the 5,000 MSCOCO-2017 val
images (FID, IS, CLIP score) and on the HPSv2 benchmark's four styles (HPSv2 score).
``toy_evaluate_params`` gives the embedded toy-world variant (32 px, toy models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

METRICS = ("fid", "is", "clip", "hpsv2")
HPS_VERSIONS = ("v2.0", "v2.1")
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


class _Params(BaseModel):
    # Unknown keys are errors: a typo in a YAML run file must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Params):
    """One model to evaluate: a diffusers pipeline folder, hub id or ``toy:<name>``."""

    # Row label in the report table (also the image folder name); letters, digits, "-", "_", ".".
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    # Diffusers StableDiffusionPipeline reference (local folder, hub id or toy:<name>).
    ref: str
    # Sampling steps for this model; None = EvaluateParams.steps (the reference runs the student at 8 only).
    steps: Optional[list[int]] = None
    # "teacher" rows are the baseline; "student" rows are distilled models (grids put them last).
    kind: Literal["teacher", "student"] = "teacher"
    # "dpmsolver++": DPM-Solver++ (2nd order) on the model's scheduler config, the reference protocol; "ddim":
    # deterministic DDIM on the grid the model was trained on (a student's distill_config.json timestep_spacing,
    # else its scheduler config's), the first-order steps a step-distilled student learned. Rows name it.
    sampler: Literal["dpmsolver++", "ddim"] = "dpmsolver++"

    @field_validator("steps")
    @classmethod
    def _positive_steps(cls, v):
        if v is not None and (not v or any(s < 1 for s in v)):
            raise ValueError(f"ModelSpec.steps must be a non-empty list of positive ints, got {v}")
        return v


def student_eval_steps(student_steps: int) -> list[int]:
    """DPM-Solver++ step counts a student is evaluated at: the steps it was distilled for and half of them
    (half left out when it is 0), most steps first."""
    return sorted({student_steps // 2, student_steps} - {0}, reverse=True)


def student_model_specs(name: str, ref: str, student_steps: int) -> list[ModelSpec]:
    """The rows a distilled student gets in the report: the reference protocol (DPM-Solver++ at
    ``student_eval_steps``) and as it was trained (first-order DDIM on its distillation grid, at its steps)."""
    return [ModelSpec(name=name, ref=ref, kind="student", steps=student_eval_steps(student_steps)),
            ModelSpec(name=name, ref=ref, kind="student", steps=[student_steps], sampler="ddim")]


class EvaluateParams(_Params):
    """Everything the evaluate stage needs besides the models and the output folder."""

    # DPM-Solver++ step counts; the reference table's 8 / 16 / 20.
    steps: list[int] = [8, 16, 20]
    # Classifier-free guidance scale s in the diffusers form eps_u + s (eps_c - eps_u); the reference's 7.5.
    guidance_scale: float = Field(default=7.5, ge=0.0)
    # Generated image side in pixels; the reference's 512 (toy world: 32).
    resolution: int = Field(default=512, ge=8)
    # Base seed: prompt i of a prompt set is sampled with torch.Generator().manual_seed(seed + i).
    seed: int = 0
    # Prompts per pipeline call (and per resumable batch); 8 fits SD-1.5 at 512 px in fp16 on 16 GB.
    batch_size: int = Field(default=8, ge=1)
    # "cuda" / "cpu" / "mps"; None = cuda when available else cpu (accelerate's PartialState picks the GPU per process).
    device: Optional[str] = None
    # Pipeline weights dtype; fp16 is the usual GPU choice, fp32 is what CPUs run.
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # MSCOCO-2017 captions file (captions_val2017.json); None = skip the COCO metrics (FID, IS, CLIP).
    coco_captions: Optional[str] = None
    # Folder of the val2017 images (the FID reference set); None = <captions dir>/../val2017 or <captions dir>/val2017.
    coco_images: Optional[str] = None
    # Prompts (first caption of each image, images sorted by id); the reference's 5,000 = all of val2017.
    max_coco_prompts: int = Field(default=5000, ge=1)
    # HPSv2 benchmark folder with one JSON list of prompts per style (anime.json, ...); None = skip HPSv2.
    hpsv2_benchmark: Optional[str] = None
    # HPSv2 benchmark styles; the benchmark's four (the reference: Animation, Concept-art, Painting, Photo).
    hpsv2_styles: list[str] = list(HPS_STYLES)
    # Prompts per style; None = all (800 in the released benchmark).
    max_prompts_per_style: Optional[int] = Field(default=None, ge=1)
    # Metrics to compute; all four by default.
    metrics: list[Literal["fid", "is", "clip", "hpsv2"]] = list(METRICS)
    # FID / IS features: "inception-v3-fid" (the TF FID InceptionV3 from a local weights file, see
    # inception_weights), a .pth path in that layout, or a folder / toy:<name> whose config.json names the class.
    feature_extractor: str = "inception-v3-fid"
    # Local FID-Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth or pytorch-fid's
    # pt_inception-2015-12-05-6726825d.pth); None = look in $TORCH_HOME/hub/checkpoints. Never downloaded.
    inception_weights: Optional[str] = None
    # Inception Score splits; 10 as in Salimans et al. (2016) and every standard implementation.
    is_splits: int = Field(default=10, ge=1)
    # HPSv2 scorer: hub id xswu/HPSv2, a local HPS_v2*.pt checkpoint, an open_clip folder or toy:<name>.
    hps_scorer: str = "xswu/HPSv2"
    # HPSv2 versions to score with; both published ones.
    hps_versions: list[Literal["v2.0", "v2.1"]] = list(HPS_VERSIONS)
    # CLIP-score model (open_clip hub layout / folder / toy:<name>); ViT-L/14 (OpenAI) as in torchmetrics' default.
    clip_model: str = "timm/vit_large_patch14_clip_224.openai"
    # Prompts shown in the image grids (the first ones of the first prompt set).
    grid_prompts: int = Field(default=4, ge=1)
    # Images timed one at a time (batch size 1) for the latency column, after one warm-up image.
    latency_images: int = Field(default=3, ge=1)
    # Bootstrap resamples of the prompts for every interval (stats.py); 1000 makes the 2.5% / 97.5% percentiles
    # stable to about a tenth of the interval's width.
    bootstrap_samples: int = Field(default=1000, ge=10)
    # FID resamples: each costs a D x D covariance and eigendecomposition (about 1.5 s at Inception's D = 2048 on
    # a CPU, 1 ms at the toy classifier's 128); None = bootstrap_samples. The first rows of the same draw.
    fid_bootstrap_samples: Optional[int] = Field(default=200, ge=10)
    # Seed of the resampled prompt indices (the same for every model, so differences are paired).
    bootstrap_seed: int = 0
    # Coverage of every interval and of the better / worse / within-noise verdicts.
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)

    @field_validator("steps")
    @classmethod
    def _positive_steps(cls, v):
        if not v or any(s < 1 for s in v):
            raise ValueError(f"EvaluateParams.steps must be a non-empty list of positive ints, got {v}")
        return v

    @field_validator("hpsv2_styles")
    @classmethod
    def _style_names(cls, v):
        bad = [s for s in v if not s or "/" in s or s.startswith(".")]
        if bad or not v:
            raise ValueError(f"hpsv2_styles must be file stems like {list(HPS_STYLES)}, got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "EvaluateParams":
        if "hpsv2" in self.metrics and not self.hps_versions:
            raise ValueError("metrics includes 'hpsv2' but hps_versions is empty; valid: ['v2.0', 'v2.1']")
        return self

    def model_steps(self, model: ModelSpec) -> list[int]:
        """The step counts this model is sampled with."""
        return list(model.steps) if model.steps else list(self.steps)

    def fid_samples(self) -> int:
        """How many of the bootstrap resamples FID is recomputed on."""
        return min(self.fid_bootstrap_samples or self.bootstrap_samples, self.bootstrap_samples)


# The toy world's held-out prompts come from their own random stream (seed 1000; training data uses 0).
TOY_PROMPT_SEED = 1000
# The toy evaluation size: 300 COCO-style prompts and 75 per HPSv2 style. Between the toy teacher's 8- and
# 20-step runs the paired 95% intervals over 300 prompts are about +-1.4 CLIP, +-8 FID and +-0.36 IS wide, so
# differences of that size or more are decided (the 4-step student's CLIP drop of about 4 is; a 0.3 is not);
# halving the widths would take 4x the prompts, past the demo's 10 minutes on 2 cores (this: about 2.5 min).
TOY_EVAL_PROMPTS = 300


def toy_prompt_spec(n: int = TOY_EVAL_PROMPTS) -> dict:
    """What ``sd_distill.toy.sources.make_eval_prompts`` is called with for ``n`` held-out COCO-style prompts:
    ``n``, the held-out seed and a quarter as many prompts per HPSv2 style."""
    return {"n": n, "seed": TOY_PROMPT_SEED, "per_style": max(1, n // 4)}


def toy_evaluate_params(prompts_dir: str, **overrides) -> EvaluateParams:
    """The embedded toy-world variant: 32 px, toy feature extractor / scorer, prompts from make_eval_prompts.

    ``prompts_dir`` is the folder ``sd_distill.toy.sources.make_eval_prompts`` wrote
    (``coco/annotations/captions_val2017.json``, ``coco/val2017/``, ``hps_benchmark/<style>.json``).
    """
    root = Path(prompts_dir)
    values = dict(
        resolution=32,
        batch_size=16,
        coco_captions=str(root / "coco" / "annotations" / "captions_val2017.json"),
        coco_images=str(root / "coco" / "val2017"),
        hpsv2_benchmark=str(root / "hps_benchmark"),
        feature_extractor="toy:classifier",
        hps_scorer="toy:hps",
        hps_versions=["v2.1"],
        clip_model="toy:hps",
        max_coco_prompts=500,
        fid_bootstrap_samples=None,  # 128-d toy features: all 1000 FID resamples take about a second
    )
    values.update(overrides)
    return EvaluateParams(**values)
