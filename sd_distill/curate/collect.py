"""Step 1, collect: every source parsed and validated -> ``samples.parquet`` + ``rejects.parquet``.

All sources are parsed before anything is written, so a malformed file stops the stage before any
download starts. Row-level problems do not stop it; they become rejects (stage ``collect``):

- ``url_missing``: no image location;
- ``path_outside_root``: a file name from the source file (COCO ``file_name``, HPDv2 paths, DiffusionDB
  ``image_name`` in an extracted folder) that is absolute or climbs out of the image folder with ``..``;
- ``unsupported_scheme`` / ``url_invalid``: a URL that is not http(s) with a host (``netguard.url_problem``):
  ``file://``, ``ftp://``, ``data:``..., and ``served://`` from a source not marked ``served``. Local
  files come only from sources that name a local folder or archive, never from a URL column;
- ``caption_not_utf8``: the caption's bytes are not valid UTF-8;
- ``caption_empty``: nothing but whitespace;
- ``caption_too_long``: more than ``CurateParams.max_caption_chars`` characters. Rejected, not
  truncated: such captions are keyword spam or pasted prompt lists whose head is no better a caption;
- ``duplicate_url``: the same URL (or local image) seen earlier, in this source or an earlier one;
  ``detail`` holds the key of the row that was kept;
- ``image_missing`` / ``caption_missing`` / ``tar_damaged``: a WebDataset sample without an image member,
  without a caption, or the one a damaged shard breaks off in (``wds.py``).

Keys are stable: a hash of the source name, the image location and the caption (plus a counter
for exact repeats), so rerunning on the same files gives the same keys. Local images inside the
output folder (the toy world's) are stored relative to it; all others keep their absolute path or URL.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from sd_distill.curate.config import CurateParams, SourceSpec
from sd_distill.curate.schema import REJECTS_FILE, SAMPLE_COLUMNS, rejects_frame, write_rejects, write_table
from sd_distill.curate.netguard import url_problem
from sd_distill.curate.sources import read_source
from sd_distill.progress import ProgressFn, report
from sd_distill.toy.sources import make_toy_sources

SAMPLES_FILE = "samples.parquet"
# local_path forms naming a member of an archive: <prefix><member>::<archive>
ARCHIVE_PREFIXES = ("zip://", "tar://")

# make_toy_sources' format names -> the adapter that reads each file
TOY_FORMATS = {
    "laion": "laion_parquet",
    "coco": "coco_json",
    "diffusiondb": "diffusiondb",
    "hpdv2_train": "hpdv2",
    "hpdv2_test": "hpdv2",
    "urls": "url_list",
}


def toy_source_specs(spec: SourceSpec, out_dir: Path) -> list[SourceSpec]:
    """Generate the toy world into ``out_dir/toy`` and describe each file it wrote as a real source."""
    root = Path(out_dir) / "toy"
    paths = make_toy_sources(
        root, n=spec.toy_n, seed=spec.toy_seed, bad_fraction=spec.toy_bad_fraction, base_url="served://toy"
    )
    specs = []
    for fmt, path in sorted(paths.items()):
        kind = TOY_FORMATS.get(fmt)
        if kind is None:
            continue  # image folders, zips, the truth table: not sources
        # served=True: the toy world's URLs point at its own loopback server (served://), explicitly allowed
        specs.append(SourceSpec(kind=kind, path=str(path), name=f"{spec.name}:{fmt}", max_rows=spec.max_rows, served=True))
    if not specs:
        raise ValueError(f"make_toy_sources wrote no source files it could read: {sorted(paths)}")
    return specs


def relative_local_path(local, root: Path):
    """``local`` relative to ``root`` when it lies inside it (also behind ``zip://`` / ``tar://member::``), else unchanged.

    The toy world writes its local images inside the collect folder, which the stage store renames
    after the step: paths stored relative to it stay valid (the download step resolves them).
    """
    if not isinstance(local, str) or not local:
        return local
    prefix, _, target = local.rpartition("::") if local.startswith(ARCHIVE_PREFIXES) else ("", "", local)
    if "://" in target:
        return local
    try:
        rel = Path(target).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return local
    return f"{prefix}::{rel}" if prefix else rel


def _caption_text(raw) -> tuple[str, str | None]:
    """(caption as text, reject reason or None) for one raw caption value."""
    if raw is None or (isinstance(raw, float) and raw != raw):
        return "", "caption_empty"
    if isinstance(raw, (bytes, bytearray)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(raw).decode("utf-8", errors="replace"), "caption_not_utf8"
    else:
        text = str(raw)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 in a text file
        return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace"), "caption_not_utf8"
    if not text.strip():
        return text, "caption_empty"
    return text, None


def _stable_keys(source: str, locators: list[str], captions: list[str]) -> list[str]:
    keys, seen = [], {}
    for loc, cap in zip(locators, captions):
        base = hashlib.sha1(f"{source}\0{loc}\0{cap}".encode("utf-8", errors="replace")).hexdigest()[:16]
        n = seen.get(base, 0)
        seen[base] = n + 1
        keys.append(base if n == 0 else f"{base}-{n}")
    return keys


def collect_sources(params: CurateParams, out_dir: Path, progress: ProgressFn | None = None) -> dict:
    """Parse and validate every source; write ``samples.parquet`` and ``rejects.parquet`` into out_dir.

    Returns counts: ``{"in": n, "samples": kept, "rejected": r, "per_source": {name: {...}}, "reasons": {...}}``.
    Raises ``SourceFormatError`` (naming the file) for a malformed source before writing anything.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs: list[SourceSpec] = []
    for spec in params.sources:
        specs.extend(toy_source_specs(spec, out_dir) if spec.kind == "toy" else [spec])

    # 1. parse everything first: a malformed file fails here, before any row is written
    tables = []
    for i, spec in enumerate(specs):
        report(progress, i, len(specs), f"reading {spec.name}")
        tables.append((spec, read_source(spec)))

    # 2. row checks, keys and cross-source URL de-duplication, in source order
    kept, rejects, per_source = [], [], {}
    first_key_by_location: dict[str, str] = {}
    for spec, df in tables:
        texts, reasons = zip(*(_caption_text(c) for c in df["caption_raw"])) if len(df) else ((), ())
        local = [relative_local_path(p, out_dir) for p in df["local_path"]]
        locators = [u if isinstance(u, str) and u else (p or "") for u, p in zip(df["url"], local)]
        rows = pd.DataFrame(
            {
                "key": _stable_keys(spec.name, locators, list(texts)),
                "source": spec.name,
                "url": df["url"].tolist(),
                "local_path": local,
                "caption_original": list(texts),
                "extra": df["extra"].tolist(),
            },
            columns=SAMPLE_COLUMNS,
        )
        reason = list(reasons)
        detail: list[str | None] = [None] * len(rows)
        problems = zip(df["problem"], df["problem_reason"])
        for j, (loc, url, (problem, problem_reason)) in enumerate(zip(locators, rows["url"], problems)):
            if isinstance(problem, str) and problem:  # the adapter refused the row (its file name, a broken sample)
                reason[j], detail[j] = problem_reason or "path_outside_root", problem
                continue
            if reason[j] is None and len(rows["caption_original"][j]) > params.max_caption_chars:
                reason[j] = "caption_too_long"
                detail[j] = f"{len(rows['caption_original'][j])} > {params.max_caption_chars} characters"
            if not loc:
                reason[j], detail[j] = "url_missing", None
            elif isinstance(url, str) and url and (problem := url_problem(url, allow_served=spec.served)):
                reason[j], detail[j] = problem
            if reason[j] is None:
                if loc in first_key_by_location:
                    reason[j], detail[j] = "duplicate_url", first_key_by_location[loc]
                else:
                    first_key_by_location[loc] = rows["key"][j]
        bad = pd.Series([r is not None for r in reason], index=rows.index, dtype=bool)
        if bad.any():
            rejects.append(
                rejects_frame(rows[bad], "collect", [r for r in reason if r], [d for d, r in zip(detail, reason) if r])
            )
        kept.append(rows[~bad])
        counts = pd.Series([r for r in reason if r]).value_counts().to_dict()
        per_source[spec.name] = {
            "kind": spec.kind,
            "file": spec.path,
            "in": int(len(rows)),
            "kept": int((~bad).sum()),
            "rejected": int(bad.sum()),
            "reasons": {str(k): int(v) for k, v in counts.items()},
        }

    samples = pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(columns=SAMPLE_COLUMNS)
    write_table(samples, out_dir / SAMPLES_FILE)
    n_rejected = write_rejects(rejects, out_dir / REJECTS_FILE)
    (out_dir / "sources.json").write_text(json.dumps([s.model_dump(mode="json") for s in specs], indent=2))
    report(progress, len(specs), len(specs), f"{len(samples)} samples")
    reasons: dict[str, int] = {}
    for s in per_source.values():
        for k, v in s["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    n_in = sum(s["in"] for s in per_source.values())
    assert n_in == len(samples) + n_rejected, "collect accounting does not close"
    return {"in": n_in, "samples": int(len(samples)), "rejected": n_rejected, "per_source": per_source, "reasons": reasons}
