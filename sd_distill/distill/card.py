"""The model card (``README.md``) of an exported student, in the Hugging Face hub's format.

YAML front matter (``library_name: diffusers``, ``pipeline_tag: text-to-image``, ``base_model`` when the
teacher is a hub id, ``tags``, ``license`` when the teacher's own card names one), then: how to sample the
student (pipeline class, scheduler, steps, guidance scale and its convention), the training data (sources,
counts, HPS filter, captions), the method and its parameters, and the evaluation.

Stage folders never change once written, so the card is written twice, each time into the stage that owns it:

1. ``export_student`` writes it into ``distill/student`` with everything known at export; its evaluation
   section, between ``EVAL_START`` and ``EVAL_END``, says the student has not been evaluated yet;
2. the evaluate report (``sd_distill.evaluate.cards``) writes the completed card, the same text with the
   evaluation section filled in (``with_evaluation``), into ``evaluate/report/<key>/cards/<model>/README.md``.

``push_to_hub`` (``hub.py``) uploads the student folder with the completed card when there is one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from sd_distill.modelref import resolve_model_ref
from sd_distill.store import StageStore

CARD_FILE = "README.md"
EVAL_START = "<!-- evaluation:start -->"
EVAL_END = "<!-- evaluation:end -->"
NOT_EVALUATED = ("Not evaluated yet. The evaluate stage writes this card again with the results table "
                 "(`evaluate/report/<key>/cards/<model>/README.md` in the stage store).")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
METHOD_TAGS = {"cfg_aware": "cfg-aware-step-distillation", "w_conditioned": "guidance-distillation",
               "progressive": "progressive-distillation", "bksdm_kd": "knowledge-distillation"}


# -- what goes in -------------------------------------------------------------------------------------
def teacher_license(teacher_ref: str) -> Optional[str]:
    """The ``license`` of the teacher's own model card, when it is at hand (a local folder's README.md, or a hub
    id's README.md in the local hub cache); None when unknown. Never downloads."""
    try:
        folder = Path(resolve_model_ref(teacher_ref))
    except (FileNotFoundError, ValueError):
        return None
    readme = folder / CARD_FILE if folder.is_dir() else None
    if readme is None and _HUB_ID.match(teacher_ref):
        try:
            from huggingface_hub import hf_hub_download  # deferred: heavy (huggingface_hub)

            readme = Path(hf_hub_download(teacher_ref, CARD_FILE, local_files_only=True))
        except Exception:  # not in the cache (or no card): unknown
            return None
    if readme is None or not readme.is_file():
        return None
    meta = front_matter(readme.read_text(errors="replace"))
    value = meta.get("license")
    return str(value) if isinstance(value, (str, int, float)) and str(value).strip() else None


def front_matter(text: str) -> dict:
    """The YAML front matter of a card (``---`` ... ``---`` at the top), {} when it has none or it is not YAML."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def data_summary(manifests: Mapping[str, Mapping[str, Any]]) -> dict:
    """The training data, from the curate stages' manifests (``{stage: manifest as a dict}``): where the curated
    set is, its per-source counts, the sources, the HPS filter and the captioning. Partition stages
    (``curate/caption-p0of4``) count as their stage; any stage may be missing."""
    def find(stage: str) -> Mapping[str, Any]:
        return next((m for s, m in manifests.items() if s == stage or s.startswith(stage + "-")), {})

    shards, sources, caption = find("curate/shards"), find("curate/sources"), find("curate/caption")
    filt = caption.get("params", {}).get("filter") or find("curate/filter").get("params") or find("curate/score").get("params")
    counts = shards.get("counts", {})
    return {
        "uri": shards.get("uri"),
        "in": counts.get("in"), "kept": counts.get("kept"), "rejected": counts.get("rejected"),
        "per_source": {name: {k: c.get(k) for k in ("in", "kept", "rejected")} for name, c in counts.get("per_source", {}).items()},
        "sources": [{k: s.get(k) for k in ("name", "kind", "path") if s.get(k) is not None}
                    for s in sources.get("params", {}).get("sources", [])],
        "filter": dict(filt or {}),
        "caption": dict(caption.get("params", {}).get("caption") or {}),
    }


def curate_manifests(shards) -> dict:
    """The curated set's manifest (a ``store.Manifest``) and those of the curate stages behind it, found in the
    curated set's own store: ``{stage: manifest as a dict}``."""
    found = {shards.stage: shards.to_dict()}
    suffix = f"/{shards.stage}/{shards.key}"
    if not shards.uri.endswith(suffix):
        return found
    store = StageStore(shards.uri[: -len(suffix)])
    for u in shards.upstream:
        m = store.find(u["stage"], u["key"])
        if m is not None:
            found[m.stage] = m.to_dict()
    return found


def training_data(shards) -> dict:
    """``data_summary`` of a curated set's manifest and the curate stages behind it."""
    return data_summary(curate_manifests(shards))


# -- the card -----------------------------------------------------------------------------------------
def card_metadata(config: Mapping[str, Any], license: Optional[str] = None) -> dict:
    """The front matter: hub fields of a diffusers text-to-image model."""
    method = config.get("params", {}).get("method", {})
    tags = ["stable-diffusion", "text-to-image", "diffusers", "distillation", "curate-and-distill"]
    tags += [t for t in (METHOD_TAGS.get(method.get("kind")), f"{config.get('student_steps')}-steps") if t]
    if config.get("pipeline") == "StableDiffusionXLPipeline":
        tags.insert(1, "stable-diffusion-xl")
    meta = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags}
    teacher = str(config.get("teacher", ""))
    if _HUB_ID.match(teacher) and not teacher.startswith(("toy:", ".", "/", "~")):
        meta["base_model"] = teacher
    if license:
        meta["license"] = license
    return meta


def _sampling_section(config: Mapping[str, Any], repo: str) -> list[str]:
    s = config.get("sampling", {})
    steps, scale = s.get("num_inference_steps", config.get("student_steps")), s.get("guidance_scale_example") or 7.5
    pipeline = config.get("pipeline", "StableDiffusionPipeline")
    lo_hi = config.get("guidance_range")
    return [
        "## How to sample", "",
        "```python", "import torch", f"from diffusers import {pipeline}", "",
        f'pipe = {pipeline}.from_pretrained("{repo}")',
        f'image = pipe("a photo of an astronaut riding a horse", num_inference_steps={steps}, guidance_scale={scale},',
        "             generator=torch.Generator().manual_seed(0)).images[0]", "```", "",
        f"- pipeline: `{pipeline}`; scheduler: `{s.get('scheduler', 'DDIMScheduler')}` with "
        f"`timestep_spacing=\"{s.get('timestep_spacing')}\"`, eta {s.get('eta', 0.0)} (the grid the student was trained on; "
        "`DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` also works)",
        f"- steps: {steps}; UNet evaluations per step: {s.get('unet_evals_per_step')}; "
        f"prediction type: `{config.get('prediction_type')}`",
        f"- guidance scale: {scale} in the middle of the trained range {lo_hi}" if lo_hi else
        "- guidance scale: any, as for the teacher (trained on unguided outputs)",
        f"- guidance convention: {config.get('guidance_convention', '')}", "",
    ]


def _data_section(data: Optional[Mapping[str, Any]]) -> list[str]:
    out = ["## Training data", ""]
    if not data:
        return out + ["Not recorded (the student was exported without its curated set's manifests).", ""]
    out += [f"Curated by the curate stage: {data.get('kept')} image-text pairs kept of {data.get('in')} "
            f"({data.get('rejected')} rejected), `{data.get('uri')}`.", "",
            "| source | kind | in | kept | rejected |", "|---|---|---|---|---|"]
    kinds = {s.get("name"): s.get("kind", "") for s in data.get("sources", [])}
    for name, c in data.get("per_source", {}).items():
        kind = kinds.get(name) or kinds.get(name.split(":", 1)[0], "")
        out.append(f"| {name} | {kind} | {c.get('in')} | {c.get('kept')} | {c.get('rejected')} |")
    f = data.get("filter") or {}
    if f:
        rule = [f"score >= {f['threshold']}" if f.get("threshold") is not None else None,
                f"best {f['top_fraction']:.0%} by score" if f.get("top_fraction") is not None else None]
        rule_text = " and ".join(r for r in rule if r) or "none (scored only)"
        out += ["", f"HPS filter: HPSv{str(f.get('hps_version', '')).lstrip('v')} (`{f.get('hps_model')}`), keep rule "
                f"{rule_text}, {'per source' if f.get('per_source') else 'over all sources'}."]
    c = data.get("caption") or {}
    if c:
        out.append(f"Captions: recaptioned with `{c.get('captioner')}`, the generated caption chosen when it matches the "
                   f"image better (margin {c.get('margin')})" if c.get("enabled") else "Captions: the published ones, cleaned.")
    return out + [""]


def _first_phases_note(method: Mapping[str, Any]) -> str:
    note = ""
    if method.get("finetune_steps"):
        note += (f"; first the teacher was fine-tuned on the curated set for {method['finetune_steps']} steps (SD's "
                 "denoising objective with caption dropout) and the student distilled from the fine-tuned teacher")
    if method.get("kd_steps"):
        note += (f"; the block-removed UNet was trained by BK-SDM's task + output + feature KD for {method['kd_steps']} "
                 "steps before step distillation")
    return note


def _method_section(config: Mapping[str, Any]) -> list[str]:
    params = config.get("params", {})
    method = params.get("method", {})
    out = ["## Method", "",
           f"`{method.get('kind')}` distillation of `{config.get('teacher')}`: {method.get('teacher_steps')} teacher steps "
           f"-> {config.get('student_steps')} student steps, student architecture `{config.get('student_arch')}`"
           f"{', w-conditioned (guidance embedding of w = s - 1)' if config.get('w_conditioned') else ''}"
           f"{_first_phases_note(method)}.", "",
           "| phase | kind | teacher -> student steps | optimizer steps | final loss |", "|---|---|---|---|---|"]
    for p in config.get("phases", []):
        info, loss, steps = p.get("phase", {}), p.get("final_loss"), p.get("steps")  # a phase.json
        out.append(f"| {info.get('name')} | {info.get('kind', '')} | {info.get('teacher_steps')} -> {info.get('student_steps')} | "
                   f"{'' if steps is None else steps} | {'' if loss is None else f'{loss:.4g}'} |")
    out += ["", "Parameters (`distill_config.json` holds all of them):", "", "```yaml",
            yaml.safe_dump({k: params.get(k) for k in ("method", "trainer", "data") if k in params},
                           sort_keys=False).rstrip(), "```", ""]
    return out


def model_card(config: Mapping[str, Any], data: Optional[Mapping[str, Any]] = None, evaluation: Optional[str] = None,
               license: Optional[str] = None, repo: Optional[str] = None) -> str:
    """The card's text for a student's ``distill_config.json`` contents (``config``); ``evaluation``: markdown for
    the evaluation section (None: not evaluated yet); ``repo``: the name to load it by (default: this folder)."""
    meta = card_metadata(config, license)
    title = f"{config.get('student_steps')}-step student of {config.get('teacher')}"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
             f"A step-distilled Stable Diffusion student, exported by curate-and-distill as a stock diffusers "
             f"`{config.get('pipeline')}` folder: the teacher's VAE, text encoder(s) and tokenizer(s) with the "
             "distilled UNet.", ""]
    lines += _sampling_section(config, repo or "path/to/this/folder")
    lines += _data_section(data)
    lines += _method_section(config)
    lines += ["## Evaluation", "", EVAL_START, (evaluation or NOT_EVALUATED).strip(), EVAL_END, "",
              "## Files", "", "- `distill_config.json`: every parameter, every phase's summary, how to sample",
              "- `loss_curve.csv`, `loss_curve.png`: the distillation loss of every phase", ""]
    return "\n".join(lines)


def with_evaluation(card: str, evaluation: str) -> str:
    """The card with its evaluation section replaced by ``evaluation`` (the rest unchanged)."""
    start, end = card.find(EVAL_START), card.find(EVAL_END)
    if start < 0 or end < start:
        raise ValueError(f"the card has no evaluation section ({EVAL_START} ... {EVAL_END})")
    return card[: start + len(EVAL_START)] + "\n" + evaluation.strip() + "\n" + card[end:]


def write_model_card(folder: str | Path, data: Optional[Mapping[str, Any]] = None, evaluation: Optional[str] = None) -> Path:
    """Write ``README.md`` into a student folder from its ``distill_config.json``; returns the path."""
    folder = Path(folder)
    config = json.loads((folder / "distill_config.json").read_text())
    path = folder / CARD_FILE
    path.write_text(model_card(config, data, evaluation, license=teacher_license(str(config.get("teacher", "")))))
    return path
