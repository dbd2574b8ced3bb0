"""Intervals and paired differences of the report, from the bootstrap replicates each image folder keeps.

Every generated image folder gets ``bootstrap.npz`` next to its images (written by ``run.compute_metrics``):

- ``meta``: int64 [3] = (n prompts, B resamples, resampling seed of the set) and float64 [1] ``level``;
- ``<key>``: float64 [B] (FID: [fid_samples]) replicates of each metric of the folder (``fid``, ``is``,
  ``clip``, ``hps<version>_<style>``), resample b recomputed on prompt indices ``bootstrap_indices(n, B, seed)[b]``;
  the set-level metrics (FID, IS) already centred on their point estimate (``stats.bias_corrected``);
- ``<key>_per_prompt``: float64 [n] per-prompt values of the mean metrics (CLIP 100 cos, HPSv2 100 score).

Two folders of one prompt set were resampled on the same index rows when their ``meta`` agree; then the
difference of their replicates is the paired bootstrap of the difference (``stats.paired_difference``). Records
without these files (written before intervals existed) simply get no interval columns and no differences.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from . import stats

REPLICATES_FILE = "bootstrap.npz"
# Metrics whose differences the markdown table and the summary show (the CSV has every metric).
HEADLINE = ("fid", "is", "clip")
DIFF_FIELDS = ["student", "student_sampler", "student_steps", "teacher", "teacher_sampler", "teacher_steps", "metric",
               "better_if", "student_value", "teacher_value", "diff", "lo", "hi", "verdict"]


def higher_is_better(key: str) -> bool:
    """FID falls as images improve; IS, CLIP score and HPSv2 rise."""
    return key != "fid"


def metric_label(key: str) -> str:
    """``fid`` -> ``FID``, ``hpsv2.1_mean`` -> ``HPSv2.1 mean``."""
    labels = {"fid": "FID", "is": "IS", "clip": "CLIP"}
    if key in labels:
        return labels[key]
    version, _, style = key.partition("_")
    return f"HPS{version[3:]} {style}" if key.startswith("hps") else key.replace("_", " ")


def write_replicates(folder: Path, n: int, samples: int, seed: int, level: float, replicates: dict,
                     per_prompt: dict) -> Path:
    """``<folder>/bootstrap.npz`` in the layout of the module docstring."""
    arrays = {"meta": np.array([n, samples, seed], dtype=np.int64), "level": np.array([level], dtype=np.float64)}
    arrays.update({k: np.asarray(v, dtype=np.float64) for k, v in replicates.items()})
    arrays.update({f"{k}_per_prompt": np.asarray(v, dtype=np.float64) for k, v in per_prompt.items()})
    path = Path(folder) / REPLICATES_FILE
    tmp = path.with_name(".bootstrap.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def read_replicates(folder: Path) -> tuple[tuple[int, int, int], dict[str, np.ndarray]] | None:
    """((n, B, seed), {metric key: replicates}) of a folder, or None when it has no replicates file."""
    path = Path(folder) / REPLICATES_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        if "meta" not in data:
            raise ValueError(f"{path}: no 'meta' array (n, B, seed); not a replicates file of this version")
        meta = tuple(int(x) for x in data["meta"])
        reps = {k: data[k] for k in data.files if k not in ("meta", "level") and not k.endswith("_per_prompt")}
    return meta, reps


def record_replicates(record: dict, hps_versions=()) -> dict[str, tuple[tuple, np.ndarray]]:
    """{metric key: (resampling meta, replicates)} over a record's image folders, plus each HPSv2 version's mean over
    styles (each style resampled on its own; the mean's replicate b is the mean of the styles' replicates b)."""
    out: dict[str, tuple[tuple, np.ndarray]] = {}
    for folder in record.get("images", {}).values():
        found = read_replicates(Path(folder))
        if found is not None:
            meta, reps = found
            out.update({k: (meta, v) for k, v in reps.items()})
    for version in hps_versions:
        styles = [k for k in out if k.startswith(f"hps{version}_") and not k.endswith("_mean")]
        if styles and len({len(out[k][1]) for k in styles}) == 1:
            metas = tuple(sorted(out[k][0] for k in styles))
            out[f"hps{version}_mean"] = (metas, np.mean([out[k][1] for k in sorted(styles)], axis=0))
    return out


def interval_columns(record: dict, hps_versions=(), level: float = 0.95) -> dict[str, float]:
    """``<key>_lo`` / ``<key>_hi`` of every metric of a record that has replicates."""
    out = {}
    for key, (_, reps) in record_replicates(record, hps_versions).items():
        out[f"{key}_lo"], out[f"{key}_hi"] = stats.percentile_interval(reps, level)
    return out


def paired_differences(records: list[dict], hps_versions=(), level: float = 0.95) -> list[dict]:
    """One row per student record x teacher record x metric both have: student - teacher with its paired interval
    and verdict (DIFF_FIELDS). Replicates from different resamplings (another prompt count, B or seed) are refused."""
    reps = [record_replicates(r, hps_versions) for r in records]
    rows = []
    for i, s in enumerate(records):
        if s.get("kind") != "student":
            continue
        for j, t in enumerate(records):
            if t.get("kind") != "teacher":
                continue
            for key in reps[i]:
                if key not in reps[j] or s.get(key) is None or t.get(key) is None:
                    continue
                (meta_s, rep_s), (meta_t, rep_t) = reps[i][key], reps[j][key]
                if meta_s != meta_t:
                    raise ValueError(f"{key}: {s['model']} and {t['model']} were resampled differently "
                                     f"(n, B, seed) {meta_s} vs {meta_t}; evaluate them with the same parameters")
                d = stats.paired_difference(s[key], t[key], rep_s, rep_t, level)
                up = higher_is_better(key)
                rows.append({"student": s["model"], "student_sampler": s.get("sampler", "dpmsolver++"),
                             "student_steps": s["steps"], "teacher": t["model"],
                             "teacher_sampler": t.get("sampler", "dpmsolver++"), "teacher_steps": t["steps"],
                             "metric": key, "better_if": "higher" if up else "lower", "student_value": s[key],
                             "teacher_value": t[key], **d, "verdict": stats.verdict(d["lo"], d["hi"], up)})
    return rows


def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.3g}" if abs(x) < 1000 else f"{x:+.1f}"


def _order(key: str) -> tuple:
    """FID, IS, CLIP first (the reference table's order), then the rest by name."""
    return (HEADLINE.index(key), "") if key in HEADLINE else (len(HEADLINE), key)


def _pairs(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    pairs: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r["student"], r["student_sampler"], r["student_steps"], r["teacher"], r["teacher_sampler"],
               r["teacher_steps"])
        pairs.setdefault(key, {})[r["metric"]] = r
    return pairs


def differences_markdown(rows: list[dict], metrics=None, level: float = 0.95) -> str:
    """A markdown table, one row per student x teacher row: ``diff [lo, hi] verdict`` per metric."""
    if not rows:
        return ""
    present = list(dict.fromkeys(r["metric"] for r in rows))
    metrics = [m for m in (metrics or present) if m in present]
    head = ["student", "sampler", "steps", "teacher", "sampler", "steps"]
    better_if = {r["metric"]: r["better_if"] for r in rows}
    head += [f"{metric_label(m)} {'↑' if better_if[m] == 'higher' else '↓'}" for m in metrics]
    lines = [f"Student minus teacher, same prompts and seeds; [{100 * level:g}% paired bootstrap interval over "
             "prompts] and the verdict it gives (the point estimate alone decides nothing).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pair, by_metric in _pairs(rows).items():
        cells = [str(x) for x in pair]
        for m in metrics:
            r = by_metric.get(m)
            cells.append("–" if r is None else f"{_num(r['diff'])} [{_num(r['lo'])}, {_num(r['hi'])}] {r['verdict']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict_lines(rows: list[dict], metrics=None) -> list[str]:
    """One sentence per student x teacher row: which metrics the intervals call better, worse, within noise."""
    out = []
    for (sm, ss, sn, tm, ts, tn), by_metric in _pairs(rows).items():
        groups: dict[str, list[str]] = {stats.BETTER: [], stats.WORSE: [], stats.WITHIN_NOISE: []}
        for m, r in sorted(by_metric.items(), key=lambda kv: _order(kv[0])):
            if metrics is None or m in metrics:
                groups[r["verdict"]].append(metric_label(m))
        parts = [f"{v} on {', '.join(names)}" for v, names in groups.items() if names]
        out.append(f"{sm} ({ss}, {sn} steps) vs {tm} ({ts}, {tn} steps): " + "; ".join(parts or ["no shared metric"]))
    return out


def write_differences(rows: list[dict], out_dir: Path, level: float = 0.95) -> dict[str, Path]:
    """differences.csv (every metric, DIFF_FIELDS) and differences.md (the headline metrics and HPSv2 means)."""
    out_dir = Path(out_dir)
    paths = {"differences_csv": out_dir / "differences.csv", "differences_markdown": out_dir / "differences.md"}
    with paths["differences_csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=DIFF_FIELDS)
        w.writeheader()
        w.writerows(rows)
    shown = list(HEADLINE) + sorted({r["metric"] for r in rows if r["metric"].endswith("_mean")})
    paths["differences_markdown"].write_text(differences_markdown(rows, shown, level))
    return paths


def read_differences(out_dir: Path) -> list[dict]:
    """The rows of a report's differences.csv (numbers parsed); [] when the report has none."""
    path = Path(out_dir) / "differences.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("student_value", "teacher_value", "diff", "lo", "hi"):
            r[k] = float(r[k])
        for k in ("student_steps", "teacher_steps"):
            r[k] = int(r[k])
    return rows
