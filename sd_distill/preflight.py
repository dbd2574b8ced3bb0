"""Fail fast: before any stage runs, every model reference a run will load resolves and its configuration reads,
and every input file it names exists.

Only configurations and file listings are read, never weights. A hub id must be in the local Hugging Face cache
unless downloads are allowed (``SD_DISTILL_ALLOW_DOWNLOAD=1``): then it is accepted as it stands, because checking
it would mean the network, and the stage that needs it fetches it. ``run_problems`` lists every problem (so a user
fixes a run file in one go); ``check_run`` raises them together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import fsspec
from huggingface_hub import snapshot_download

from sd_distill.curate.config import CurateParams
from sd_distill.distill.config import DistillParams
from sd_distill.distill.teacher import check_teacher_folder
from sd_distill.evaluate.config import EvaluateParams
from sd_distill.evaluate.metrics.features import INCEPTION_REF
from sd_distill.evaluate.metrics.inception import find_inception_weights
from sd_distill.modelref import allow_download, hub_kwargs, resolve_model_ref
from sd_distill.scoring.hps import HPS_FILES
from sd_distill.scoring.openclip import CHECKPOINT_SUFFIXES, CONFIG_FILE

NOT_CACHED = ("a hub id that is not in the local Hugging Face cache (downloads are off: set SD_DISTILL_ALLOW_DOWNLOAD=1, "
              "or download it first and give its folder; docs/real-weights.md)")


class PreflightError(ValueError):
    """A run that cannot finish: each problem names the parameter, the reference and what is wrong."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("the run cannot start; fix these first:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _hub_ok(ref: str) -> bool:
    """A hub id the stage may fetch itself (downloads allowed): nothing to check offline."""
    return allow_download() and ref.count("/") == 1 and not Path(ref).exists()


def check_pipeline(ref: str) -> None:
    """A diffusers Stable Diffusion (XL) pipeline: components present, UNet and scheduler configs readable."""
    from diffusers import UNet2DConditionModel  # deferred: heavy (diffusers)

    if _hub_ok(ref):
        return
    resolved = resolve_model_ref(ref)
    check_teacher_folder(resolved)
    try:
        UNet2DConditionModel.load_config(resolved, subfolder="unet", **hub_kwargs())
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"its unet config cannot be read ({type(exc).__name__}: {exc})") from exc


def check_open_clip(ref: str, checkpoint_names: Sequence[str] = ()) -> None:
    """An open_clip model as ``load_open_clip`` takes it: a checkpoint file, a hub-layout folder, a folder holding
    one of ``checkpoint_names``, toy:<name>, or a cached hub repo."""
    if _hub_ok(ref):
        return
    path = Path(resolve_model_ref(ref)).expanduser()
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"{path} is not a checkpoint file (expected one of {CHECKPOINT_SUFFIXES})")
        return
    if not path.is_dir():
        if ref.count("/") != 1:
            raise FileNotFoundError("neither an existing file or folder, toy:<name>, nor a hub repo id 'owner/name'")
        try:
            path = Path(snapshot_download(ref, allow_patterns=[CONFIG_FILE, *checkpoint_names], local_files_only=True))
        except Exception as exc:  # a cache miss raises one of several hub error types
            raise FileNotFoundError(NOT_CACHED) from exc
    if (path / CONFIG_FILE).is_file():
        json.loads((path / CONFIG_FILE).read_text())
        return
    if not any((path / name).is_file() for name in checkpoint_names):
        raise FileNotFoundError(f"{path} holds neither {CONFIG_FILE} nor any of {list(checkpoint_names)}")


def check_transformers(ref: str) -> None:
    """A transformers model (BLIP-family captioner): its config reads."""
    from transformers import AutoConfig  # deferred: heavy (transformers)

    if _hub_ok(ref):
        return
    resolved = resolve_model_ref(ref)
    try:
        AutoConfig.from_pretrained(resolved, **hub_kwargs())
    except (OSError, ValueError) as exc:
        if not Path(resolved).exists():
            raise FileNotFoundError(NOT_CACHED) from exc
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FileNotFoundError(f"its config cannot be read ({type(exc).__name__}: {first_line})") from exc


def check_feature_extractor(ref: str, inception_weights: Optional[str]) -> None:
    """The FID / IS feature extractor: the FID Inception weights file, or a folder whose config.json names a class."""
    if ref == INCEPTION_REF:
        find_inception_weights(inception_weights)
        return
    path = Path(resolve_model_ref(ref))
    if path.is_file() and path.suffix in (".pth", ".pt"):
        return
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"expected {INCEPTION_REF!r}, an FID Inception .pth file, or a folder / toy:<name> "
                                "with a config.json naming its class")


def check_path(path: str, want: str = "any") -> None:
    """A local file / folder (``want``: "file", "dir", "any") or an fsspec URL that exists."""
    if _is_url(path):
        fs, inner = fsspec.core.url_to_fs(path)
        if not fs.exists(inner):
            raise FileNotFoundError("does not exist")
        return
    p = Path(path.removeprefix("file://")).expanduser()
    if not p.exists():
        raise FileNotFoundError("does not exist")
    if want == "file" and not p.is_file():
        raise FileNotFoundError("is a folder, expected a file")
    if want == "dir" and not p.is_dir():
        raise FileNotFoundError("is a file, expected a folder")


def run_problems(curate: Optional[CurateParams], distill: Optional[DistillParams],
                 evaluate: Optional[EvaluateParams]) -> list[str]:
    """Every problem that would stop the run later, as ``"<parameter> = <value>: <what is wrong>"`` lines.

    A stage given as None is not checked (it runs on another machine, or it is the embedded toy evaluation,
    whose models ship with the package)."""
    checks: list[tuple[str, str, Callable[[], None]]] = []
    checks += _curate_checks(curate) if curate is not None else []
    if distill is not None:
        checks.append(("distill.teacher", distill.teacher, lambda: check_pipeline(distill.teacher)))
    checks += _evaluate_checks(evaluate) if evaluate is not None else []
    problems = []
    for where, value, check in checks:
        try:
            check()
        except (OSError, ValueError, TypeError) as exc:
            problems.append(f"{where} = {value!r}: {exc}")
    return problems


def _curate_checks(curate: CurateParams) -> list[tuple[str, str, Callable[[], None]]]:
    checks: list[tuple[str, str, Callable[[], None]]] = []
    for i, src in enumerate(curate.sources):
        if src.kind != "toy":
            checks.append((f"curate.sources[{i}].path", src.path, lambda s=src: check_path(s.path)))
        root = src.images_root
        if root and not _is_url(root) and not root.startswith("served://"):
            checks.append((f"curate.sources[{i}].images_root", root, lambda r=root: check_path(r, "dir")))
    checks.append(("curate.filter.hps_model", curate.filter.hps_model,
                   lambda: check_open_clip(curate.filter.hps_model, [HPS_FILES[curate.filter.hps_version]])))
    if curate.caption.enabled:
        checks.append(("curate.caption.captioner", curate.caption.captioner,
                       lambda: check_transformers(curate.caption.captioner)))
    return checks


def _evaluate_checks(e: EvaluateParams) -> list[tuple[str, str, Callable[[], None]]]:
    checks: list[tuple[str, str, Callable[[], None]]] = []
    if {"fid", "is"} & set(e.metrics):
        checks.append(("evaluate.feature_extractor", e.feature_extractor,
                       lambda: check_feature_extractor(e.feature_extractor, e.inception_weights)))
    if "hpsv2" in e.metrics:
        for version in e.hps_versions:
            checks.append((f"evaluate.hps_scorer ({version})", e.hps_scorer,
                           lambda v=version: check_open_clip(e.hps_scorer, [HPS_FILES[v]])))
    if "clip" in e.metrics:
        checks.append(("evaluate.clip_model", e.clip_model, lambda: check_open_clip(e.clip_model)))
    for name, want in (("coco_captions", "file"), ("coco_images", "dir"), ("hpsv2_benchmark", "dir")):
        value = getattr(e, name)
        if value:
            checks.append((f"evaluate.{name}", value, lambda v=value, w=want: check_path(v, w)))
    return checks


def check_run(curate: Optional[CurateParams], distill: Optional[DistillParams],
              evaluate: Optional[EvaluateParams]) -> None:
    """Raise ``PreflightError`` listing every problem; return quietly when the run can start."""
    problems = run_problems(curate, distill, evaluate)
    if problems:
        raise PreflightError(problems)
