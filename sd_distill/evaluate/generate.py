"""Image generation for evaluation: DPM-Solver++ or DDIM on a student's trained grid; resumable, sharded.

Every prompt i of a prompt set is sampled with its own ``torch.Generator().manual_seed(seed + i)``
(on the CPU, so the initial noise is the same on every device and in every batch), hence every model
and step count starts from the same latent for the same prompt. Work is cut into batches of
``batch_size`` prompts; a batch is done when its marker ``_batches/<b>.json`` exists (written after
its PNGs), so an interrupted run continues at the first missing batch. Batches are split across
processes with accelerate's ``PartialState().split_between_processes`` (``accelerate launch``).

Classifier-free guidance follows diffusers: ``eps_u + s (eps_c - eps_u)`` with s = ``guidance_scale``, one UNet
call on the doubled batch, i.e. two UNet evaluations per image per step. A w-conditioned student
(``unet.config.time_cond_proj_dim`` set) gets Imagen's w = s - 1 as a guidance embedding instead and one
evaluation per step; the stock pipeline does both, and ``UNetEvalCounter`` measures what happened.

The sampler is the ModelSpec's: ``dpmsolver++`` (the reference protocol, on the model's own scheduler config) or
``ddim`` (eta = 0 on the timestep spacing the model was distilled on: what a step-distilled student learned to take).

SDXL models (``StableDiffusionXLPipeline`` folders: model_index.json's ``_class_name``) load as that class and
follow the same contract; they are sampled with the pipeline's defaults for everything SDXL adds (micro-
conditioning original size = target size = the resolution, zero negative embeddings when
``force_zeros_for_empty_prompt``), which is what the distillation trained on (:mod:`sd_distill.distill.teacher`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from accelerate import PartialState
from PIL import Image

from sd_distill.distill.teacher import read_model_index
from sd_distill.modelref import hub_kwargs, resolve_model_ref
from sd_distill.progress import ProgressFn, report

from .config import EvaluateParams, ModelSpec
from .prompts import PromptSet

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: Optional[str]) -> torch.device:
    """The requested device, or accelerate's per-process device (cuda:<local rank> / cpu)."""
    if device:
        return torch.device(device)
    return PartialState().device


def pipeline_class_name(ref: str) -> str:
    """``_class_name`` of a pipeline's model_index.json ("StableDiffusionPipeline" when it cannot be read offline)."""
    return str((read_model_index(ref) or {}).get("_class_name") or "StableDiffusionPipeline")


def load_pipeline(ref: str, device: Optional[str] = None, dtype: str = "float32", sampler: str = "dpmsolver++"):
    """A StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL folders) from a folder / hub id / toy:<name>
    with the ``sampler``'s scheduler (``sampler_scheduler``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # deferred: heavy (diffusers)

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    resolved = resolve_model_ref(ref)
    name = pipeline_class_name(resolved)
    if name == "StableDiffusionXLPipeline":
        pipe = StableDiffusionXLPipeline.from_pretrained(resolved, torch_dtype=DTYPES[dtype], add_watermarker=False,
                                                         **hub_kwargs())
    elif "XL" in name:
        raise ValueError(f"{ref} is a {name}; evaluation generates text-to-image with StableDiffusionPipeline or "
                         "StableDiffusionXLPipeline folders")
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            resolved, torch_dtype=DTYPES[dtype], safety_checker=None, requires_safety_checker=False, **hub_kwargs(),
        )
    pipe.scheduler = sampler_scheduler(pipe.scheduler, sampler, resolved)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(device))


SAMPLERS = ("dpmsolver++", "ddim")


def sampler_scheduler(scheduler, sampler: str, ref: Optional[str] = None):
    """The scheduler a sampler name stands for, on the model's own noise schedule and prediction type.

    ``dpmsolver++``: DPM-Solver++ (Lu et al. 2022, multistep, 2nd order) on the scheduler config's timestep
    spacing. ``ddim``: DDIM (eta 0, first order) on ``trained_timestep_spacing(ref)`` when the folder records
    one, else the scheduler config's spacing.
    """
    from diffusers import DDIMScheduler  # deferred: heavy (diffusers)

    if sampler == "dpmsolver++":
        return dpm_solver_pp_scheduler(scheduler)
    if sampler == "ddim":
        spacing = trained_timestep_spacing(ref) if ref else None
        return DDIMScheduler.from_config(scheduler.config, timestep_spacing=spacing or
                                         scheduler.config.get("timestep_spacing", "leading"))
    raise ValueError(f"unknown sampler {sampler!r}; valid: {list(SAMPLERS)}")


def trained_timestep_spacing(folder: str) -> Optional[str]:
    """The DDIM timestep spacing a distilled student's ``distill_config.json`` records (None when there is none)."""
    path = Path(folder) / "distill_config.json"
    if not path.is_file():
        return None
    sampling = json.loads(path.read_text()).get("sampling")
    return sampling.get("timestep_spacing") if isinstance(sampling, dict) else None


def dpm_solver_pp_scheduler(scheduler):
    """DPM-Solver++ (Lu et al. 2022, multistep, 2nd order) on the model's own noise schedule and prediction type."""
    from diffusers import DPMSolverMultistepScheduler  # deferred: heavy (diffusers)

    return DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++")


class UNetEvalCounter:
    """Counts UNet evaluations (rows of the UNet input batch) with a forward pre-hook.

    A CFG step calls the UNet once on 2B rows for B images: 2 evaluations per image; a
    w-conditioned student's step: 1. ``calls`` counts forward calls.
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet, self.evals, self.calls, self._handle = unet, 0, 0, None

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        self.evals += int(sample.shape[0])
        self.calls += 1

    def __enter__(self) -> "UNetEvalCounter":
        self._handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def prompt_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    """One CPU generator per prompt, seeded ``seed + index``: the same noise in any batch, on any device."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in indices]


def images_folder(out_dir: Path, model: ModelSpec, steps: int, prompt_set: PromptSet) -> Path:
    """``<out_dir>/<model>/steps-<n>/<prompt set>`` (``ddim-steps-<n>`` with DDIM); image i is ``<i:05d>.png``
    (HPSv2's naming)."""
    prefix = "" if model.sampler == "dpmsolver++" else f"{model.sampler}-"
    return Path(out_dir) / model.name / f"{prefix}steps-{steps}" / prompt_set.name


def generation_fingerprint(params: EvaluateParams, model: ModelSpec, steps: int, prompt_set: PromptSet) -> dict:
    """What determines the images of a folder; a resumed run must match it."""
    digest = hashlib.sha256("\n".join(prompt_set.prompts).encode()).hexdigest()[:16]
    return {"ref": model.ref, "sampler": model.sampler, "steps": steps, "guidance_scale": params.guidance_scale,
            "resolution": params.resolution, "seed": params.seed, "batch_size": params.batch_size, "dtype": params.dtype,
            "prompts": len(prompt_set), "prompts_sha256": digest}


def _check_fingerprint(folder: Path, fingerprint: dict) -> None:
    path = folder / "generation.json"
    if path.is_file():
        old = json.loads(path.read_text()).get("fingerprint")
        if old is not None:
            old.setdefault("sampler", "dpmsolver++")  # folders written before samplers were named were DPM-Solver++
        if old != fingerprint:
            diff = {k: (old.get(k) if old else None, v) for k, v in fingerprint.items() if not old or old.get(k) != v}
            raise ValueError(f"{folder} holds images generated with other settings {diff} (old, new); "
                             "use another out_dir or delete the folder")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fingerprint": fingerprint}, indent=1))


def _write_batch(folder: Path, b: int, indices: list[int], images, seconds: float, evals: int) -> None:
    for i, img in zip(indices, images):
        tmp = folder / f".{i:05d}.png.tmp"
        img.save(tmp, format="PNG")
        os.replace(tmp, folder / f"{i:05d}.png")
    marker = folder / "_batches" / f"{b:05d}.json"
    marker.parent.mkdir(exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"indices": indices, "seconds": seconds, "unet_evals": evals}))
    os.replace(tmp, marker)


def generate_images(params: EvaluateParams, model: ModelSpec, steps: int, prompt_set: PromptSet, out_dir: Path,
                    progress: ProgressFn | None = None, pipe=None, max_batches: Optional[int] = None) -> Path:
    """Generate (or finish generating) ``prompt_set`` with ``model`` at ``steps`` steps of its sampler.

    Returns the image folder; its ``generation.json`` holds the fingerprint and, when every batch is
    done, ``summary`` (images, seconds per image, UNet evaluations per image). ``pipe`` reuses a loaded
    pipeline; ``max_batches`` stops after that many new batches (used to test resuming).
    """
    folder = images_folder(out_dir, model, steps, prompt_set)
    state = PartialState()
    if state.is_main_process:
        _check_fingerprint(folder, generation_fingerprint(params, model, steps, prompt_set))
    state.wait_for_everyone()
    n, bs = len(prompt_set), params.batch_size
    batches = [b for b in range((n + bs - 1) // bs) if not (folder / "_batches" / f"{b:05d}.json").is_file()]
    if batches and pipe is None:
        pipe = load_pipeline(model.ref, params.device, params.dtype, model.sampler)
    done_new = 0
    with state.split_between_processes(batches) as mine:
        for k, b in enumerate(mine):
            if max_batches is not None and done_new >= max_batches:
                break
            indices = list(range(b * bs, min(n, (b + 1) * bs)))
            start = time.perf_counter()
            with UNetEvalCounter(pipe.unet) as counter, torch.inference_mode():
                images = pipe(prompt=[prompt_set.prompts[i] for i in indices], num_inference_steps=steps,
                              guidance_scale=params.guidance_scale, height=params.resolution, width=params.resolution,
                              generator=prompt_generators(params.seed, indices), output_type="pil").images
            _write_batch(folder, b, indices, images, time.perf_counter() - start, counter.evals)
            done_new += 1
            report(progress, k + 1, len(mine), f"{model.name} {steps} steps {prompt_set.name}: batch {b}")
    state.wait_for_everyone()
    if state.is_main_process:
        _write_summary(folder, n, bs)
    return folder


def _write_summary(folder: Path, n: int, bs: int) -> None:
    """Totals from the batch markers once every batch is done (so resumed runs count every batch once)."""
    markers = [folder / "_batches" / f"{b:05d}.json" for b in range((n + bs - 1) // bs)]
    if not all(m.is_file() for m in markers):
        return
    stats = [json.loads(m.read_text()) for m in markers]
    meta = json.loads((folder / "generation.json").read_text())
    meta["summary"] = {
        "images": n,
        "seconds_per_image": sum(s["seconds"] for s in stats) / n,
        "unet_evals_per_image": sum(s["unet_evals"] for s in stats) / n,
    }
    (folder / "generation.json").write_text(json.dumps(meta, indent=1))


def generation_summary(folder: Path) -> dict:
    """The ``summary`` of a finished image folder; a clear error if generation is incomplete."""
    meta = json.loads((Path(folder) / "generation.json").read_text())
    if "summary" not in meta:
        raise RuntimeError(f"generation in {folder} is not finished (missing batch markers in {folder}/_batches)")
    return meta["summary"]


class LazyImages(Sequence):
    """Image files as a read-only sequence of RGB PIL images, decoded on access (5,000 512 px images stay on disk).

    Indexing with a slice returns a list, so batched consumers (``images[i:i + b]``) hold one batch at a time.
    """

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        with Image.open(self.paths[index]) as im:
            return im.convert("RGB")


def load_images(folder: Path, n: int) -> LazyImages:
    """Images ``00000.png .. <n-1>.png`` of a folder (decoded lazily); a clear error if any is missing."""
    paths = [Path(folder) / f"{i:05d}.png" for i in range(n)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} generated images missing in {folder}, e.g. {missing[:3]}")
    return LazyImages(paths)
