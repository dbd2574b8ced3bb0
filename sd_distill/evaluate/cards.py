"""The completed model card of every evaluated student: its export card with the evaluation section filled in.

A student's folder (``distill/student``) never changes once written, so the report stage writes the completed
card into its own folder, ``cards/<model>/README.md``: the card ``export_student`` wrote (``sd_distill.distill.card``)
with its evaluation section replaced by this student's rows and the teachers' rows of the results table (values
with their intervals) and its paired differences to the teachers. Students without a ``distill_config.json`` (not
exported by this project) get no card.
"""

from __future__ import annotations

import json
from pathlib import Path

from sd_distill.distill.card import CARD_FILE, model_card, with_evaluation
from sd_distill.modelref import resolve_model_ref

from .compare import differences_markdown, paired_differences
from .config import EvaluateParams
from .report import table_columns, table_markdown

CARDS_DIR = "cards"


def evaluation_markdown(params: EvaluateParams, records: list[dict], model: str) -> str:
    """The evaluation section of ``model``'s card: the protocol, its rows and the teachers', paired differences."""
    rows = [r for r in records if r.get("kind") == "teacher" or r["model"] == model]
    level = f"{params.confidence:.0%}"
    sets = sorted({s for r in rows for s in r.get("images", {})})
    lines = [f"Evaluated by curate-and-distill's evaluate stage on the prompt sets {', '.join(f'`{s}`' for s in sets)}: "
             f"{params.resolution} px, guidance scale {params.guidance_scale} (diffusers form), prompt i seeded with "
             f"{params.seed} + i, the same noise for every model. Metrics as value [{level} bootstrap interval over "
             f"prompts, {params.bootstrap_samples} resamples].", "",
             table_markdown(table_columns(params, rows), rows).strip()]
    differences = [d for d in paired_differences(rows, params.hps_versions, params.confidence) if d["student"] == model]
    if differences:
        lines += ["", f"Student minus teacher, paired over prompts ({level} intervals):", "",
                  differences_markdown(differences, level=params.confidence).strip()]
    return "\n".join(lines)


def student_card(ref: str) -> str | None:
    """The export card of a student reference (regenerated from ``distill_config.json`` when the folder has none);
    None when the reference is not a student this project exported."""
    try:
        folder = Path(resolve_model_ref(ref))
    except (FileNotFoundError, ValueError):
        return None
    if not (folder / "distill_config.json").is_file():
        return None
    if (folder / CARD_FILE).is_file():
        return (folder / CARD_FILE).read_text()
    return model_card(json.loads((folder / "distill_config.json").read_text()))


def write_student_cards(params: EvaluateParams, records: list[dict], out_dir: Path) -> list[Path]:
    """``out_dir/cards/<model>/README.md`` for every student in ``records`` that has a card; returns the paths."""
    paths = []
    refs = {r["model"]: r.get("ref") for r in records if r.get("kind") == "student" and r.get("ref")}
    for model, ref in refs.items():
        card = student_card(ref)
        if card is None:
            continue
        path = Path(out_dir) / CARDS_DIR / model / CARD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(with_evaluation(card, evaluation_markdown(params, records, model)))
        paths.append(path)
    return paths
