"""Prompt sets of the evaluation protocol, read from the published files.

- MSCOCO 2017 captions (``captions_val2017.json``: ``images`` [{id, file_name, ...}], ``annotations``
  [{image_id, id, caption}]): the first caption of each image (lowest annotation id), images sorted by
  id, up to N; the val2017 images of those captions are the FID reference set.
- HPSv2 benchmark (``zhwang/HPDv2`` dataset, ``benchmark/<style>.json``): one JSON list of prompt
  strings per style, styles ``anime``, ``concept-art``, ``paintings``, ``photo`` (800 prompts each);
  HPSv2 names the generated image of prompt i ``<style>/<i:05d>.jpg``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class PromptSet:
    """Prompts generated and scored together; ``name`` is also the image sub-folder (``coco``, ``hpsv2-anime``)."""

    name: str
    prompts: list[str]
    # kind decides the metrics: "coco" gets FID / IS / CLIP, "hpsv2" gets the HPSv2 score of its style.
    kind: str
    # HPSv2 style of an "hpsv2" set.
    style: Optional[str] = None
    # Reference images (COCO val) in prompt order, for FID.
    reference_images: list[Path] = field(default_factory=list)
    # Stable ids of the prompts (COCO image ids; benchmark indexes).
    ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def load_coco_prompts(captions_file: str | Path, images_dir: str | Path | None = None, max_prompts: int = 5000,
                      check_images: bool = True) -> PromptSet:
    """The first caption of each COCO image (images sorted by id, at most ``max_prompts``) and its image file."""
    path = Path(captions_file)
    data = _read_json(path, "COCO captions file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: a COCO captions file needs top-level lists 'images' and 'annotations' "
                         f"(got keys {sorted(data) if isinstance(data, dict) else type(data).__name__})")
    files: dict[int, str] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise ValueError(f"{path}: images[{i}] needs 'id' and 'file_name', got {img!r:.120}")
        files[int(img["id"])] = str(img["file_name"])
    first: dict[int, tuple[int, str]] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{path}: annotations[{i}] needs 'image_id' and a string 'caption', got {ann!r:.120}")
        image_id, ann_id = int(ann["image_id"]), int(ann.get("id", i))
        if image_id not in files:
            raise ValueError(f"{path}: annotations[{i}] refers to image_id {image_id}, which is not in 'images'")
        if image_id not in first or ann_id < first[image_id][0]:
            first[image_id] = (ann_id, ann["caption"].strip())
    ids = sorted(first)[:max_prompts]
    if not ids:
        raise ValueError(f"{path}: no captions found")
    folder = _coco_images_dir(path, images_dir)
    refs = [folder / files[i] for i in ids]
    if check_images:
        missing = [str(p) for p in refs if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} COCO reference images missing in {folder}, e.g. {missing[:3]}")
    return PromptSet("coco", [first[i][1] for i in ids], kind="coco", reference_images=refs, ids=ids)


def _coco_images_dir(captions_file: Path, images_dir: str | Path | None) -> Path:
    """images_dir, or val2017/ next to the captions file or next to its annotations/ folder (COCO's own layout)."""
    if images_dir is not None:
        return Path(images_dir)
    for candidate in (captions_file.parent / "val2017", captions_file.parent.parent / "val2017"):
        if candidate.is_dir():
            return candidate
    return captions_file.parent / "val2017"


def load_hpsv2_prompts(benchmark_dir: str | Path, styles: list[str], max_per_style: int | None = None) -> list[PromptSet]:
    """One PromptSet per style from ``<benchmark_dir>/<style>.json`` (a JSON list of prompt strings)."""
    folder = Path(benchmark_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"HPSv2 benchmark folder not found: {folder}")
    sets = []
    for style in styles:
        path = folder / f"{style}.json"
        if not path.is_file():
            have = sorted(p.stem for p in folder.glob("*.json"))
            raise FileNotFoundError(f"HPSv2 benchmark style file {path} not found; styles present: {have}")
        prompts = _read_json(path, f"HPSv2 benchmark file for style {style!r}")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: expected a JSON list of prompt strings (the HPSv2 benchmark layout)")
        if not prompts:
            raise ValueError(f"{path}: the prompt list is empty")
        prompts = [p.strip() for p in prompts[:max_per_style]]
        sets.append(PromptSet(f"hpsv2-{style}", prompts, kind="hpsv2", style=style, ids=list(range(len(prompts)))))
    return sets


def load_prompt_sets(params) -> list[PromptSet]:
    """Every prompt set the parameters name: COCO first (the grids use it), then the HPSv2 styles."""
    sets: list[PromptSet] = []
    wants_coco = any(m in params.metrics for m in ("fid", "is", "clip"))
    if params.coco_captions and wants_coco:
        sets.append(load_coco_prompts(params.coco_captions, params.coco_images, params.max_coco_prompts,
                                      check_images="fid" in params.metrics))
    if params.hpsv2_benchmark and "hpsv2" in params.metrics:
        sets.extend(load_hpsv2_prompts(params.hpsv2_benchmark, params.hpsv2_styles, params.max_prompts_per_style))
    if not sets:
        raise ValueError("no prompt set to evaluate: set coco_captions (for fid/is/clip) and/or hpsv2_benchmark "
                         f"(for hpsv2); metrics = {params.metrics}")
    return sets
