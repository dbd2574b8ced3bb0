"""The evaluation report: the reference table (markdown, CSV, JSON records), paired differences, grids and plots.

Rows are model x sampler x steps; columns FID, IS, CLIP, HPSv2 per version, style and mean (leaderboard scale),
latency, UNet evaluations and size. Only the metrics that were computed get a column. Every metric with
bootstrap replicates has its interval: ``<key>_lo`` / ``<key>_hi`` columns right after it in table.csv,
``value [lo, hi]`` in table.md. differences.csv / .md hold each student row minus each teacher row (``compare``).
``cards/<student>/README.md`` is each exported student's model card with its evaluation filled in (``cards.py``).
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from .compare import paired_differences, write_differences
from .config import EvaluateParams
from .prompts import load_prompt_sets

FIXED_COLUMNS = [("model", "model"), ("kind", "kind"), ("steps", "steps"), ("sampler", "sampler")]
METRIC_COLUMNS = [("fid", "FID ↓"), ("is", "IS ↑"), ("is_std", "IS std"), ("clip", "CLIP ↑")]
SPEED_COLUMNS = [("latency_s", "latency s/img"), ("images_per_s", "img/s (batched)"), ("unet_evals", "UNet evals"),
                 ("unet_params_m", "UNet params M"), ("unet_gmacs_per_image", "UNet GMACs/img")]
PLOTTED = ["fid", "is", "clip", "latency_s"]


def hps_key(version: str, style: str) -> str:
    """Record key of an HPSv2 column, e.g. ``hpsv2.1_anime`` / ``hpsv2.1_mean``."""
    return f"hps{version}_{style}"


def table_columns(params: EvaluateParams, records: list[dict]) -> list[tuple[str, str]]:
    """(record key, header) of every column present in at least one record, in the reference order."""
    hps = []
    for v in params.hps_versions:
        for style in list(params.hpsv2_styles) + ["mean"]:
            hps.append((hps_key(v, style), f"HPS{v} {style} ↑" if style == "mean" else f"HPS{v} {style}"))
    cols = FIXED_COLUMNS + METRIC_COLUMNS + hps + SPEED_COLUMNS
    return [(k, h) for k, h in cols if any(k in r for r in records)]


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def _cell(record: dict, key: str) -> str:
    """A value, with ``[lo, hi]`` after it when the record has its interval."""
    text = _fmt(record.get(key))
    if record.get(f"{key}_lo") is not None and record.get(f"{key}_hi") is not None:
        text += f" [{_fmt(record[f'{key}_lo'])}, {_fmt(record[f'{key}_hi'])}]"
    return text


def table_markdown(columns: list[tuple[str, str]], records: list[dict]) -> str:
    """A GitHub markdown table of the records (metrics as ``value [lo, hi]`` where intervals exist)."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, k) for k, _ in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def csv_columns(columns: list[tuple[str, str]], records: list[dict]) -> list[str]:
    """The table's keys with ``<key>_lo``, ``<key>_hi`` after every key that has an interval in some record."""
    keys = []
    for k, _ in columns:
        keys.append(k)
        keys += [f"{k}{end}" for end in ("_lo", "_hi") if any(f"{k}{end}" in r for r in records)]
    return keys


def write_table(params: EvaluateParams, records: list[dict], out_dir: Path) -> dict[str, Path]:
    """table.md, table.csv (same rows; the CSV adds the interval columns), records.json (every key of every record)
    and, when students and teachers have replicates, differences.csv / differences.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = table_columns(params, records)
    paths = {"markdown": out_dir / "table.md", "csv": out_dir / "table.csv", "records": out_dir / "records.json"}
    paths["markdown"].write_text(table_markdown(columns, records) + notes_markdown(records))
    keys = csv_columns(columns, records)
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in records:
            w.writerow(["" if r.get(k) is None else r.get(k) for k in keys])
    paths["records"].write_text(json.dumps(records, indent=1))
    differences = paired_differences(records, params.hps_versions, params.confidence)
    if differences:
        paths.update(write_differences(differences, out_dir, params.confidence))
    return paths


def notes_markdown(records: list[dict]) -> str:
    """The table's notes: each distinct ``guidance_note`` (a student sampled outside its trained guidance range)."""
    notes = list(dict.fromkeys(r["guidance_note"] for r in records if r.get("guidance_note")))
    return "".join(f"\nNote: {n}.\n" for n in notes)


def grid_rows(records: list[dict]) -> list[dict]:
    """Grid rows: teachers at each of their steps, then students (the reference compares teacher 8/16/20 vs student 8)."""
    return sorted(records, key=lambda r: (r.get("kind") != "teacher", r["model"], r.get("sampler", ""), r["steps"]))


GRID_HEADER = 40  # pixels above the grid for the prompts, when they are known


def image_grid(params: EvaluateParams, records: list[dict], set_name: str, out_path: Path, cell: int = 256,
               prompts: list[str] | None = None) -> Path | None:
    """A PNG grid: one row per model x steps, one column per prompt (same prompts and seeds in every row),
    with each column's prompt written above it when ``prompts`` is given."""
    rows = [r for r in grid_rows(records) if set_name in r.get("images", {})]
    if not rows:
        return None
    first = Path(rows[0]["images"][set_name])
    n = min(params.grid_prompts, len(list(first.glob("[0-9]*.png"))))
    if n == 0:
        return None
    size = min(cell, params.resolution * 4 if params.resolution < 64 else cell)
    label_w, pad = 150, 2
    header = GRID_HEADER if prompts else 0
    grid = Image.new("RGB", (label_w + n * (size + pad), header + len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for x, prompt in enumerate((prompts or [])[:n]):
        lines = textwrap.wrap(prompt, width=max(8, size // 6))[:3]
        draw.text((label_w + x * (size + pad) + 2, 2), "\n".join(lines), fill="black")
    for y, r in enumerate(rows):
        top = header + y * (size + pad)
        draw.text((4, top + size // 2 - 18), f"{r['model']}\n{r['steps']} steps\n{r.get('sampler', '')}", fill="black")
        for x in range(n):
            with Image.open(Path(r["images"][set_name]) / f"{x:05d}.png") as im:
                tile = im.convert("RGB").resize((size, size), Image.NEAREST if im.width < size else Image.BICUBIC)
            grid.paste(tile, (label_w + x * (size + pad), top))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_path)
    return out_path


def metric_plot(params: EvaluateParams, records: list[dict], out_path: Path) -> Path | None:
    """A PNG with one panel per metric (FID, IS, CLIP, HPSv2 means, latency) against steps, one line per model and
    sampler, with the intervals as error bars."""
    import matplotlib  # deferred: heavy (matplotlib)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: heavy (matplotlib)

    keys = [k for k in PLOTTED[:3] + [hps_key(v, "mean") for v in params.hps_versions] + PLOTTED[3:]
            if any(r.get(k) is not None for r in records)]
    if not keys:
        return None
    labels = dict(METRIC_COLUMNS + SPEED_COLUMNS + [(hps_key(v, "mean"), f"HPS{v} mean") for v in params.hps_versions])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        lines = list(dict.fromkeys((r["model"], r.get("sampler")) for r in records))
        for i, (model, sampler) in enumerate(lines):
            dodge = 0.12 * (i - (len(lines) - 1) / 2)  # error bars of rows at the same steps side by side
            pts = sorted((r["steps"], r[key], r.get(f"{key}_lo"), r.get(f"{key}_hi")) for r in records
                         if (r["model"], r.get("sampler")) == (model, sampler) and r.get(key) is not None)
            if pts:
                label = model if sampler in (None, "dpmsolver++") else f"{model} ({sampler})"
                line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)[0]
                bars = [p for p in pts if p[2] is not None and p[3] is not None]
                if bars:
                    yerr = [[max(0.0, p[1] - p[2]) for p in bars], [max(0.0, p[3] - p[1]) for p in bars]]
                    ax.errorbar([p[0] + dodge for p in bars], [p[1] for p in bars], yerr=yerr, fmt="none",
                                ecolor=line.get_color(), capsize=2)
        ax.set_xlabel("steps")
        ax.set_title(labels.get(key, key))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def _prompt_texts(params: EvaluateParams) -> dict[str, list[str]]:
    """Prompt set name -> prompts, for the grid headers; empty when the prompt files are not at hand."""
    try:
        return {ps.name: list(ps.prompts) for ps in load_prompt_sets(params)}
    except (OSError, ValueError):
        return {}


def build_report(params: EvaluateParams, results: list[dict], out_dir: Path) -> dict:
    """Write the table (md / csv / json), one grid per prompt set and the metrics plot; return the summary."""
    out_dir = Path(out_dir)
    files = {k: str(v) for k, v in write_table(params, results, out_dir).items()}
    sets = list(dict.fromkeys(s for r in results for s in r.get("images", {})))
    prompts = _prompt_texts(params)
    grids = [image_grid(params, results, s, out_dir / "grids" / f"{s}.png", prompts=prompts.get(s)) for s in sets]
    files["grids"] = [str(g) for g in grids if g is not None]
    plot = metric_plot(params, results, out_dir / "metrics_vs_steps.png")
    if plot is not None:
        files["plot"] = str(plot)
    from .cards import write_student_cards  # deferred: cycle (report <-> cards: cards renders this module's table)

    files["cards"] = [str(p) for p in write_student_cards(params, results, out_dir)]
    columns = table_columns(params, results)
    diffs = out_dir / "differences.md"
    return {"rows": len(results), "columns": [k for k, _ in columns], "records": results, "files": files,
            "markdown": (out_dir / "table.md").read_text(),
            "differences_markdown": diffs.read_text() if "differences_markdown" in files else ""}
