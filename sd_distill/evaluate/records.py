"""``records.json``: the evaluate stage's results file, its schema, writer and reader.

A ``records.json`` is a JSON list with one record (object) per model x sampler x steps. An
``evaluate/model-<name>`` stage writes its image folders relative to the stage folder (the folder is
renamed into place after it is written); the ``evaluate/report`` stage's copy holds them as absolute paths.

Fields (``Record``):

| field | type | what |
| --- | --- | --- |
| ``model`` | str | the row label, ``ModelSpec.name`` |
| ``kind`` | ``teacher`` / ``student`` | ``ModelSpec.kind`` |
| ``steps`` | int >= 1 | sampling steps |
| ``images`` | {set name: folder} | one generated image folder per prompt set |
| ``sampler`` | ``dpmsolver++`` / ``ddim``, optional | absent in records of earlier runs: read as DPM-Solver++ |
| ``timestep_spacing``, ``ref``, ``guidance_note`` | str, optional | the scheduler's spacing, the model reference, why a student ran outside its trained guidance range |
| every other key | number or null | a metric (``fid``, ``is``, ``is_std``, ``clip``, ``hps<version>_<style>``, ``hps<version>_mean``), its interval (``<key>_lo`` / ``<key>_hi``) or a speed figure (``images_per_s``, ``latency_s``, ``unet_evals``, ...) |

``read_records`` checks every record on load and names the file, the record and the field that is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RECORDS_FILE = "records.json"


class Record(BaseModel):
    """One row of ``records.json``; metric keys are extra fields (numbers or null)."""

    model_config = ConfigDict(extra="allow")

    model: str
    kind: Literal["teacher", "student"]
    steps: int = Field(ge=1)
    images: dict[str, str]
    sampler: Optional[Literal["dpmsolver++", "ddim"]] = None
    timestep_spacing: Optional[str] = None
    ref: Optional[str] = None
    guidance_note: Optional[str] = None

    @model_validator(mode="after")
    def _numeric_metrics(self) -> "Record":
        bad = {k: v for k, v in (self.model_extra or {}).items()
               if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))}
        if bad:
            raise ValueError(f"metric fields must be numbers or null, got {bad}")
        return self


def check_records(records: object, source: Union[str, Path] = "records") -> list[dict]:
    """``records`` if it is a list of valid records; else a ValueError naming ``source``, the record and the field."""
    if not isinstance(records, list):
        raise ValueError(f"{source}: records.json holds a JSON list of records, got {type(records).__name__}")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{source}: record {i} is a {type(r).__name__}, not an object")
        try:
            Record.model_validate(r)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'record'}: {err['msg']}"
                                 for err in e.errors())
            raise ValueError(f"{source}: record {i} (model {r.get('model')!r}, steps {r.get('steps')!r}) is "
                             f"invalid: {problems}") from None
    return records


def read_records(path: Union[str, Path]) -> list[dict]:
    """The records of a ``records.json`` file, as plain dicts, checked against ``Record``."""
    path = Path(path)
    return check_records(json.loads(path.read_text()), path)


def write_model_records(records: list[dict], folder: Path) -> Path:
    """``<folder>/records.json`` with every image folder relative to ``folder``."""
    path = Path(folder) / RECORDS_FILE
    path.write_text(json.dumps(check_records(relative_images(records, Path(folder)), path), indent=1))
    return path


def relative_images(records: list[dict], base: Path) -> list[dict]:
    """Copies of ``records`` with image folders relative to ``base`` (a stage folder)."""
    rows = []
    for r in records:
        r = dict(r)
        r["images"] = {k: str(Path(v).relative_to(base)) for k, v in r.get("images", {}).items()}
        rows.append(r)
    return rows


def load_model_records(folder: Union[str, Path]) -> list[dict]:
    """A model stage folder's records with image folders as absolute paths under ``folder``."""
    folder = Path(folder)
    records = read_records(folder / RECORDS_FILE)
    for r in records:
        r["images"] = {k: str(folder / v) for k, v in r["images"].items()}
    return records
