"""Where few steps hurt: the toy teacher's metrics against its number of sampling steps.

    .venv/bin/python benchmarks/bench_teacher_steps.py [--teacher toy:sd] [--steps 2,4,8,16,20,50] \
        [--prompts 300] [--store runs/store] [--json results.json] [--smoke]

The teacher samples the demo's held-out toy prompts (the same prompts and seeds as the demo's report) with
DPM-Solver++ at guidance 7.5 for every step count of ``--steps``; each row carries toy-FID, IS, CLIP, toy-HPS
(v2.1, mean over the four styles) and the attribute accuracy of the generated scenes with their 95% bootstrap
intervals over prompts, the pixel RMSE to the teacher's own images at the most steps, and each row's paired
difference to that most-steps row (called better / worse / within noise from its interval alone). The headline
question it answers: how much a sampler at 8 steps loses against 20 and 50 on this teacher, which bounds what a
student distilled to 8 steps can gain by matching the teacher's trajectory alone.

``--smoke``: steps 2,4, 40 prompts: the wiring in about a minute; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows._common import inline_run_environment  # noqa: E402

inline_run_environment()  # offline, no telemetry, a patient temporary Prefect server: before Prefect is imported

from flows.evaluate import evaluate  # noqa: E402
from sd_distill.evaluate.config import ModelSpec  # noqa: E402

# (record key, label, digits)
METRICS = (("fid", "toy-FID ↓", 1), ("is", "IS ↑", 2), ("clip", "CLIP ↑", 2), ("hpsv2.1_mean", "toy-HPS ↑", 2),
           ("attribute_accuracy", "attribute accuracy ↑", 3), ("rmse_to_ref", "pixel RMSE to most steps ↓", 4))


def measure(report_uri: str) -> dict:
    """Rows with intervals (metrics and toy measures) and each row's paired difference to the most-steps row."""
    from sd_distill.evaluate import compare
    from sd_distill.store import load_manifest
    from sd_distill.toy.measures import generation_differences, report_generation_measures

    report = load_manifest(report_uri)
    records, toy_rows, boot = report_generation_measures(report.path, report.params)
    level = boot["level"]
    toy = {r["steps"]: r for r in toy_rows}
    most = max(r["steps"] for r in records)
    rows, diffs = [], {}
    for r in sorted(records, key=lambda r: r["steps"]):
        row = {"steps": r["steps"], "unet_evals": r.get("unet_evals")}
        for key, _, _ in METRICS:
            source = toy[r["steps"]] if key in toy[r["steps"]] else r
            row.update({k: source.get(k) for k in (key, f"{key}_lo", f"{key}_hi")})
        rows.append(row)
        if r["steps"] == most:
            continue
        # the paired differences compare "student" rows with "teacher" rows: the fewer-step run plays the student
        pair = [dict(r, kind="student"), dict(next(x for x in records if x["steps"] == most), kind="teacher")]
        found = {d["metric"]: d for d in compare.paired_differences(pair, ["v2.1"], level)}
        toy_pair = [dict(toy[r["steps"]], kind="student"), dict(toy[most], kind="teacher")]
        found.update({d["metric"]: d for d in generation_differences(toy_pair, **boot)})
        diffs[r["steps"]] = {k: {f: found[k][f] for f in ("diff", "lo", "hi", "verdict")}
                             for k, _, _ in METRICS if k in found}
    return {"most_steps": most, "rows": rows, "differences": diffs}


def _cell(value, lo, hi, digits: int) -> str:
    if value is None:
        return "–"
    if lo is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def tables(res: dict) -> str:
    head = "| steps | UNet evals | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(METRICS))]
    for row in res["rows"]:
        cells = [str(row["steps"]), "–" if row["unet_evals"] is None else f"{row['unet_evals']:.0f}"]
        cells += [_cell(row.get(k), row.get(f"{k}_lo"), row.get(f"{k}_hi"), d) for k, _, d in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    most = res["most_steps"]
    lines += ["", f"Each step count minus {most} steps (same prompts and seeds), [95% paired bootstrap interval] "
              "and the verdict it gives:", "",
              "| steps | " + " | ".join(label for k, label, _ in METRICS if k != "rmse_to_ref") + " |",
              "|" + "---|" * len(METRICS)]
    for steps, by_metric in res["differences"].items():
        cells = [f"{steps} - {most}"]
        for k, _, d in METRICS:
            if k == "rmse_to_ref":
                continue
            r = by_metric.get(k)
            cells.append("–" if r is None else f"{r['diff']:+.{d}f} [{r['lo']:+.{d}f}, {r['hi']:+.{d}f}] {r['verdict']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="toy:sd", help="teacher pipeline (toy:<name>, folder or hub id)")
    ap.add_argument("--steps", default="2,4,8,16,20,50", help="comma-separated DPM-Solver++ step counts")
    ap.add_argument("--prompts", type=int, default=300, help="held-out toy prompts (default 300, the demo's)")
    ap.add_argument("--store", default=os.environ.get("SD_DISTILL_STORE", "runs/store"), help="stage store root")
    ap.add_argument("--json", help="also write the measured numbers here")
    ap.add_argument("--smoke", action="store_true", help="steps 2,4 on 40 prompts: wiring only")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.prompts = "2,4", 40
    steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    if len(steps) < 2 or steps[0] < 1:
        ap.error(f"--steps needs at least two positive step counts, got {args.steps!r}")
    from flows._common import resolve_store_root

    store = resolve_store_root(args.store)
    start = time.time()
    report = evaluate(models=[ModelSpec(name="teacher", ref=args.teacher, kind="teacher", steps=steps)],
                      params=None, toy_prompts=args.prompts, store_root=store)
    res = measure(report.uri)
    wall = time.time() - start
    print(f"teacher {args.teacher}, DPM-Solver++, guidance 7.5, {args.prompts} held-out toy prompts "
          f"({max(1, args.prompts // 4)} per HPSv2 style); wall {wall:.0f} s")
    print(tables(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "wall_s": wall, "report": report.uri, **res},
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
