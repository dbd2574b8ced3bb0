"""The end-of-run summary a person reads: counts, scores, the results table, where everything is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sd_distill.evaluate.compare import HEADLINE, differences_markdown, read_differences, verdict_lines


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _counts_lines(counts: dict[str, Any]) -> list[str]:
    lines = []
    per_source = counts.get("per_source") or counts.get("sources")
    scalars = {k: v for k, v in counts.items() if isinstance(v, (int, float, str))}
    if scalars:
        lines.append(", ".join(f"{k}: {_fmt(v)}" for k, v in scalars.items()))
    if isinstance(per_source, dict):
        keys = sorted({k for v in per_source.values() for k in v if not isinstance(v[k], dict)})
        lines += ["", "| source | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for name, row in per_source.items():
            lines.append(f"| {name} | " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return lines


def toy_lines(toy: dict) -> list[str]:
    """The toy world's ground-truth checks as markdown."""
    c = toy["curation"]
    out = ["## Toy world: measured against ground truth",
           f"HPS filter vs planted bad pairs: rejected {c['rejected']} of {c['samples']} "
           f"({c['planted_bad']} planted bad): precision {c['reject_precision']:.2f}, recall {c['reject_recall']:.2f}; "
           f"bad pairs {100 * c['bad_fraction_in']:.0f}% in -> {100 * c['bad_fraction_kept']:.1f}% kept.",
           f"Caption accuracy of kept samples: {c['caption_accuracy_original']:.3f} published -> "
           f"{c['caption_accuracy_final']:.3f} after recaptioning ({c['recaptioned']} recaptioned).", "",
           ]
    gen = toy["generation"]
    ref = next((g["reference"] for g in gen if "reference" in g), None)
    if ref:
        out += [f"Paired with `{ref}` (same prompt, same seed): pixel RMSE and the share of scene attributes read "
                "the same. Means over prompts [95% bootstrap interval].",
                "", "| model | sampler | steps | attribute accuracy of generated scenes ↑ | "
                f"pixel RMSE to {ref} ↓ | agreement with {ref} ↑ |", "|---|---|---|---|---|---|"]
        out += [f"| {g['model']} | {g.get('sampler', '')} | {g['steps']} | {_interval(g, 'attribute_accuracy', 3)} | "
                f"{_interval(g, 'rmse_to_ref', 4)} | {_interval(g, 'agreement_with_ref', 3)} |" for g in gen]
    else:
        out += ["| model | sampler | steps | attribute accuracy of generated scenes ↑ |", "|---|---|---|---|"]
        out += [f"| {g['model']} | {g.get('sampler', '')} | {g['steps']} | {_interval(g, 'attribute_accuracy', 3)} |"
                for g in gen]
    diffs = toy.get("generation_differences") or []
    if diffs:
        out += ["", differences_markdown(diffs).strip()]
    return out + [""]


def _interval(row: dict, key: str, digits: int) -> str:
    """``value [lo, hi]`` (just the value when the row has no interval)."""
    text = f"{row[key]:.{digits}f}"
    if row.get(f"{key}_lo") is not None and row.get(f"{key}_hi") is not None:
        text += f" [{row[f'{key}_lo']:.{digits}f}, {row[f'{key}_hi']:.{digits}f}]"
    return text


def verdict_section(report_dir: Path, toy: dict | None = None) -> list[str]:
    """The verdicts of every student row against every teacher row, read from the paired intervals only."""
    rows = read_differences(report_dir)
    shown = set(HEADLINE) | {r["metric"] for r in rows if r["metric"].endswith("_mean")}
    lines = [f"- {line}" for line in verdict_lines(rows, shown)]
    toy_rows = (toy or {}).get("generation_differences") or []
    lines += [f"- toy measures, {line}" for line in verdict_lines(toy_rows)]
    if not lines:
        return []
    return ["### Verdicts", "Better / worse where the 95% paired bootstrap interval of student minus teacher excludes 0 "
            "(in the metric's good direction), within noise where it contains 0; the point estimates decide nothing.",
            ""] + lines + [""]


def run_summary(curated, student, report, ui_url: str | None = None, toy: dict | None = None) -> str:
    """Markdown summary of one curate-and-distill run from its three stage manifests."""
    out = ["# curate-and-distill: run summary", ""]
    out += ["## Curate", f"Shards: `{curated.uri}`", ""] + _counts_lines(curated.counts) + [""]
    out += ["## Distill", f"Student pipeline: `{student.uri}`"]
    config_file = Path(student.uri) / "distill_config.json"
    if "://" not in student.uri and config_file.exists():
        config = json.loads(config_file.read_text())
        method = config.get("params", {}).get("method", {})
        if method:
            out.append(f"Method: `{method.get('kind')}`, teacher {method.get('teacher_steps')} -> student "
                       f"{method.get('student_steps')} steps; prediction type `{config.get('prediction_type')}`")
            if method.get("finetune_steps"):
                out.append(f"The teacher was first fine-tuned on the curated set ({method['finetune_steps']} steps, "
                           "SD's objective) and the student distilled from the fine-tuned teacher")
            if method.get("kd_steps"):
                out.append(f"The {method.get('student_arch')} block-removed UNet was first trained by BK-SDM's KD "
                           f"({method['kd_steps']} steps) and then step-distilled")
    out += [""] + _counts_lines(student.counts) + [""]
    out += ["## Evaluate", f"Report: `{report.uri}` (table.md, table.csv, grids/, metrics_vs_steps.png)", ""]
    table = Path(report.uri) / "table.md"
    if "://" not in report.uri and table.exists():
        out += ["Metrics: value [95% bootstrap interval over prompts].", "", table.read_text().strip(), ""]
        differences = Path(report.uri) / "differences.md"
        if differences.exists():
            out += [differences.read_text().strip(), ""]
    if toy:
        out += toy_lines(toy)
    if "://" not in report.uri:
        out += verdict_section(Path(report.uri), toy)
    if ui_url:
        out += [f"Prefect UI: {ui_url}"]
    return "\n".join(out) + "\n"
