"""What the curate stage did, as plain data: a per-source table and the HPS score distribution.

``summarize(shards_dir)`` reads only the final stage folder (the part files' ``source`` and
``hps_score`` columns and the merged ``rejects.parquet``), so it works on any finished curate output,
including one reused from the stage store. The Prefect layer turns ``table`` into a table artifact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sd_distill.curate.filter import score_quantiles
from sd_distill.curate.schema import read_rejects
from sd_distill.curate.shards import read_curated

STAGES = ("collect", "download", "filter", "recaption")


def summarize(shards_dir: Path, bins: int = 10) -> dict:
    """``{"table": [row per source + "all"], "reasons": [...], "scores": {...}}``, JSON-serializable.

    Table columns: source, in, downloaded (passed collect and download), scored (= downloaded: every
    downloaded image is scored), kept, rejected, and one ``rejected:<stage>`` count per stage.
    ``reasons``: one row per (source, stage, reason) with its count. ``scores``: quantiles and a
    histogram of HPS scores for all scored samples and for the kept ones.
    """
    kept = read_curated(shards_dir, columns=["source", "hps_score"])
    rejects = read_rejects(shards_dir)
    sources = sorted(set(kept["source"]) | set(rejects["source"]))
    rows = []
    for name in sources + ["all"]:
        k = kept if name == "all" else kept[kept["source"] == name]
        r = rejects if name == "all" else rejects[rejects["source"] == name]
        by_stage = {s: int((r["stage"] == s).sum()) for s in STAGES}
        n_in = len(k) + len(r)
        downloaded = n_in - by_stage["collect"] - by_stage["download"]
        rows.append(
            {
                "source": name,
                "in": int(n_in),
                "downloaded": int(downloaded),
                "scored": int(downloaded),
                "kept": int(len(k)),
                "rejected": int(len(r)),
                **{f"rejected:{s}": v for s, v in by_stage.items()},
            }
        )
    reasons = (
        rejects.groupby(["source", "stage", "reason"]).size().reset_index(name="count").sort_values(["source", "stage", "count"], ascending=[True, True, False])
    )
    scored = np.concatenate([kept["hps_score"].to_numpy(np.float32), rejects["hps_score"].dropna().to_numpy(np.float32)])
    summary = {
        "table": rows,
        "reasons": [{k: (int(v) if k == "count" else v) for k, v in r.items()} for r in reasons.to_dict(orient="records")],
        "scores": {"all_scored": _distribution(scored, bins), "kept": _distribution(kept["hps_score"].to_numpy(np.float32), bins)},
    }
    summary["markdown"] = summary_markdown(summary)
    return summary


def _distribution(scores: np.ndarray, bins: int) -> dict:
    s = scores[np.isfinite(scores)]
    if not len(s):
        return {"quantiles": {}, "histogram": {"edges": [], "counts": []}}
    counts, edges = np.histogram(s, bins=bins)
    return {"quantiles": score_quantiles(s), "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}}


def _markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict) -> str:
    """Counts per source, rejects by reason and the HPS score distribution as Markdown."""
    parts = ["### Samples per source\n", _markdown_table(summary["table"])]
    if summary["reasons"]:
        parts += ["\n### Rejected, by stage and reason\n", _markdown_table(summary["reasons"])]
    for name, dist in summary["scores"].items():
        q = dist["quantiles"]
        if not q:
            continue
        parts.append(f"\n### HPS scores: {name.replace('_', ' ')} (n={q['n']})\n")
        parts.append(_markdown_table([{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in q.items()}]))
        h = dist["histogram"]
        peak = max(h["counts"]) or 1
        bars = [f"{lo:+.4f} .. {hi:+.4f} | {'#' * round(20 * c / peak)} {c}" for lo, hi, c in zip(h["edges"], h["edges"][1:], h["counts"])]
        parts.append("\n```\n" + "\n".join(bars) + "\n```\n")
    return "".join(parts)
