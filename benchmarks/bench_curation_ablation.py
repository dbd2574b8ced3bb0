"""What each curate step is worth to the student: the same student distilled from three curated sets.

    .venv/bin/python benchmarks/bench_curation_ablation.py [--store runs/store] [--prompts 300] [--steps 600] \
        [--data-loss-weights 0.5,0] [--json results.json] [--smoke]

On the embedded toy world (the demo's sources, ``sd_distill/toy/demo.py``: one toy source of 2,000 generated
pairs, a quarter of them planted bad), the curate flow runs three times; every variant keeps the download step's
decode checks and de-duplication:

* (a) ``uncurated``: no HPS filter (``filter.top_fraction`` and ``filter.threshold`` unset: every decoded pair is
  kept) and no recaption (``caption.enabled: false``: the cleaned original captions);
* (b) ``hps``: the demo's HPS filter (best 70% per source by toy-HPS), no recaption;
* (c) ``hps+recaption``: filter and recaption, the demo's default curate parameters.

Each variant's steps are their own cached stages (download is shared, (b) and (c) share the score stage). The
same student is distilled from each: the demo's distill parameters (``toy:sd`` fine-tuned on the curated set, then
CFG-aware 16 -> 8 from the fine-tuned teacher, half the states on its path) with ``--steps`` distillation steps
and a denoising data term on the curated latents (``method.data_loss_weight``, one student per value of
``--data-loss-weights``); ``--method`` / ``--trainer KEY=VALUE`` set any other method or trainer field for every
student (e.g. ``vanilla_loss_weight=0``, ``warmup_steps=100``, ``finetune_steps=0`` for distillation from the
teacher as it is). Without the fine-tune and that term the loss sees
the curated images only through the noised states z_t (and not at all on the teacher-path half), and the
captions only as conditioning. Every student is evaluated with DPM-Solver++ at 8 steps, and the teacher at 8
and 20 steps (``TEACHER_STEPS``), guidance 7.5, on the same ``--prompts`` held-out toy prompts and seeds:
toy-FID, CLIP, toy-HPS (v2.1, mean over the four styles) and the attribute accuracy of the generated scenes,
each with its 95% bootstrap interval over prompts. Then the paired differences (c)-(a), (b)-(a), (c)-(b), and
each student minus the teacher at 8 and at 20 steps, on the same resampled prompts (``sd_distill.evaluate.compare``
/ ``stats``; attribute accuracy through ``sd_distill.toy.measures``), each called better / worse / within noise
from its interval alone.

``--smoke``: 48 source pairs, 4 fine-tune and 4 distillation steps, 40 prompts (10 per style, the fewest that get
intervals): checks the wiring in about two minutes on an idle 2-core box; its numbers mean nothing.
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

from prefect import flow  # noqa: E402

from flows.curate import curate  # noqa: E402
from flows.distill import distill  # noqa: E402
from flows.evaluate import evaluate  # noqa: E402
from sd_distill.curate.config import CurateParams, SourceSpec  # noqa: E402
from sd_distill.distill.config import DistillParams  # noqa: E402
from sd_distill.evaluate.config import ModelSpec  # noqa: E402
from sd_distill.toy.demo import DEMO_DISTILL, DEMO_TOY_N  # noqa: E402

# variant label -> (description, curate parameter overrides on the demo's CurateParams)
VARIANTS = {
    "a": ("uncurated (decode checks + dedup only)", {"filter": {"top_fraction": None, "threshold": None},
                                                       "caption": {"enabled": False}}),
    "b": ("HPS filter, original captions", {"caption": {"enabled": False}}),
    "c": ("HPS filter + recaption (demo default)", {}),
}
PAIRS = (("c", "a"), ("b", "a"), ("c", "b"))
STUDENT_STEPS = 8
TEACHER_STEPS = (8, 20)  # the teacher's rows: the student's step count and the reference's 20-step baseline
# (record key, label, higher is better)
METRICS = (("fid", "toy-FID ↓", False), ("clip", "CLIP ↑", True), ("hpsv2.1_mean", "toy-HPS ↑", True),
           ("attribute_accuracy", "attribute accuracy ↑", True))


def curate_params(variant: str, toy_n: int) -> CurateParams:
    """The demo's curate parameters (``CurateParams()``), with the variant's switches and ``toy_n`` pairs."""
    params = CurateParams().model_dump()
    params["sources"] = [SourceSpec(kind="toy", toy_n=toy_n).model_dump()]
    for section, values in VARIANTS[variant][1].items():
        params[section].update(values)
    return CurateParams.model_validate(params)


def distill_params(steps: int, data_loss_weight: float, lr: float | None = None, method: dict | None = None,
                   trainer: dict | None = None) -> DistillParams:
    """The demo's distill parameters (``DEMO_DISTILL``) with ``steps`` training steps, the data term's weight, (when
    given) ``lr``, and any further ``method`` / ``trainer`` fields (``--method`` / ``--trainer KEY=VALUE``)."""
    base = DEMO_DISTILL.model_dump(exclude_unset=True)
    trainer = {**base.get("trainer", {}), "max_steps": steps, **({"lr": lr} if lr is not None else {}), **(trainer or {})}
    return DistillParams.model_validate({**base, "method": {**base.get("method", {}), "data_loss_weight": data_loss_weight,
                                                            **(method or {})}, "trainer": trainer})


def overrides(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings as a dict; each value read as JSON (numbers, null, true) or else kept as a string."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"override {pair!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def student_name(variant: str, weight: float) -> str:
    return f"{variant}-w{weight:g}"


@flow(name="bench-curation-ablation", log_prints=True)
def ablation_flow(toy_n: int, steps: int, weights: list[float], prompts: int, store: str,
                  variants: list[str] = list(VARIANTS), lr: float | None = None, method: dict | None = None,
                  trainer: dict | None = None) -> dict:
    timings: dict[str, float] = {}
    shards = {}
    for v in variants:
        start = time.time()
        shards[v] = curate(params=curate_params(v, toy_n), store_root=store)
        timings[f"curate {v}"] = time.time() - start
    students = {}
    for w in weights:
        for v in variants:
            start = time.time()
            students[student_name(v, w)] = distill(params=distill_params(steps, w, lr, method, trainer), curated=shards[v].uri,
                                                   store_root=store)
            timings[f"distill {student_name(v, w)}"] = time.time() - start
    models = [ModelSpec(name="teacher", ref="toy:sd", kind="teacher", steps=list(TEACHER_STEPS))]
    models += [ModelSpec(name=name, ref=m.uri, kind="student", steps=[STUDENT_STEPS]) for name, m in students.items()]
    start = time.time()
    report = evaluate(models=models, params=None, toy_prompts=prompts, store_root=store)
    timings["evaluate"] = time.time() - start
    return {"shards": {v: m.uri for v, m in shards.items()}, "sources": {v: m.upstream[0]["key"] for v, m in shards.items()},
            "students": {n: m.uri for n, m in students.items()}, "report": report.uri, "timings": timings}


def measure(out: dict, store: str, weights: list[float]) -> dict:
    """Per model: each metric with its interval; per data weight and pair: the paired differences."""
    from sd_distill.evaluate import compare
    from sd_distill.store import StageStore, load_manifest
    from sd_distill.toy.measures import curation_measures, generation_differences, report_generation_measures

    report = load_manifest(out["report"])
    records, generated, boot = report_generation_measures(report.path, report.params)
    level = boot["level"]
    toy_rows = {_label(r): r for r in generated}
    by_name = {_label(r): r for r in records}

    rows = {}
    for name, r in by_name.items():
        row = {k: r.get(k) for k, _, _ in METRICS[:3]}
        row.update({k: v for k, v in compare.interval_columns(r, ["v2.1"], level).items()
                    if k.rsplit("_", 1)[0] in row})
        t = toy_rows[name]
        row.update({k: t.get(k) for k in ("attribute_accuracy", "attribute_accuracy_lo", "attribute_accuracy_hi")})
        rows[name] = row

    store_ = StageStore(store)
    curation = {v: curation_measures(store_.find("curate/sources", out["sources"][v]).path, load_manifest(uri).path)
                for v, uri in out["shards"].items()}

    def difference(a: str, b: str) -> dict:
        # the project's paired differences compare "student" rows with "teacher" rows: relabel the pair
        pair = [dict(by_name[a], kind="student"), dict(by_name[b], kind="teacher")]
        found = {d["metric"]: d for d in compare.paired_differences(pair, ["v2.1"], level)}
        toy_pair = [dict(toy_rows[a], kind="student"), dict(toy_rows[b], kind="teacher", reference=None)]
        found.update({d["metric"]: d for d in generation_differences(toy_pair, **boot)})
        return {k: {f: found[k][f] for f in ("diff", "lo", "hi", "verdict")} for k, _, _ in METRICS if k in found}

    diffs = {}
    for w in weights:
        for hi_v, lo_v in (p for p in PAIRS if set(p) <= set(out["shards"])):
            diffs[f"({hi_v})-({lo_v}) w{w:g}"] = difference(student_name(hi_v, w), student_name(lo_v, w))
    for w in weights:  # every student against the teacher it was distilled from
        for v in out["shards"]:
            for steps in TEACHER_STEPS:
                diffs[f"({v}) w{w:g} - teacher@{steps}"] = difference(student_name(v, w), f"teacher@{steps}")
    return {"rows": rows, "curation": curation, "differences": diffs}


def _label(record: dict) -> str:
    """Row label: the student's name, or ``teacher@<steps>`` for the teacher's rows."""
    return f"{record['model']}@{record['steps']}" if record.get("kind") == "teacher" else record["model"]


def _fmt(x, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


DIGITS = {"fid": 1, "clip": 2, "hpsv2.1_mean": 2, "attribute_accuracy": 3}


def tables(res: dict, weights: list[float]) -> str:
    lines = ["| model | curated set | kept | bad kept | caption accuracy | "
             + " | ".join(label for _, label, _ in METRICS) + " |",
             "|" + "---|" * (5 + len(METRICS))]
    names = [f"teacher@{s}" for s in TEACHER_STEPS] + [student_name(v, w) for w in weights for v in res["curation"]]
    for name in names:
        row = res["rows"][name]
        if name.startswith("teacher@"):
            cells = [f"teacher `toy:sd`, {name.split('@')[1]} steps", "–", "–", "–", "–"]
        else:
            v, w = name.split("-w")
            c = res["curation"][v]
            kept = c["samples"] - c["rejected"]
            cells = [f"student ({v}), data weight {w}", VARIANTS[v][0], str(kept), f"{c['bad_fraction_kept']:.1%}",
                     f"{c['caption_accuracy_final']:.3f}"]
        for k, _, _ in METRICS:
            d = DIGITS[k]
            cells.append(f"{_fmt(row.get(k), d)} [{_fmt(row.get(k + '_lo'), d)}, {_fmt(row.get(k + '_hi'), d)}]")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (same prompts and seeds), [95% paired bootstrap interval] and the verdict it gives:",
              "", "| difference | " + " | ".join(label for _, label, _ in METRICS) + " |", "|" + "---|" * (1 + len(METRICS))]
    for pair, by_metric in res["differences"].items():
        cells = [pair]
        for k, _, _ in METRICS:
            r = by_metric.get(k)
            d = DIGITS[k]
            cells.append("–" if r is None else
                         f"{r['diff']:+.{d}f} [{r['lo']:+.{d}f}, {r['hi']:+.{d}f}] {r['verdict']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=os.environ.get("SD_DISTILL_STORE", "runs/store"), help="stage store root")
    ap.add_argument("--prompts", type=int, default=300, help="held-out toy prompts (default 300, the demo's)")
    ap.add_argument("--steps", type=int, default=DEMO_DISTILL.trainer.max_steps,
                    help="distillation steps per student (default: the demo's)")
    ap.add_argument("--data-loss-weights", default="0",
                    help="comma-separated method.data_loss_weight values, one student per variant each (default 0)")
    ap.add_argument("--variants", default="a,b,c", help="comma-separated curated sets to train on (default a,b,c)")
    ap.add_argument("--lr", type=float, help="the students' learning rate (default: the demo's trainer.lr)")
    ap.add_argument("--toy-n", type=int, default=DEMO_TOY_N, help=f"generated source pairs (default {DEMO_TOY_N}, the demo's)")
    ap.add_argument("--method", action="append", default=[], metavar="KEY=VALUE",
                    help="further method field for every student, e.g. vanilla_loss_weight=0 (repeatable)")
    ap.add_argument("--trainer", action="append", default=[], metavar="KEY=VALUE",
                    help="further trainer field for every student, e.g. warmup_steps=100 (repeatable)")
    ap.add_argument("--json", help="also write the measured numbers here")
    ap.add_argument("--smoke", action="store_true", help="tiny run (48 pairs, 4 steps, 40 prompts): wiring only")
    args = ap.parse_args()
    if args.smoke:
        args.toy_n, args.steps, args.prompts = 48, 4, 40
        args.method = ["finetune_steps=4", *args.method]
    weights = [float(w) for w in args.data_loss_weights.split(",") if w.strip()]
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    if not variants:
        ap.error(f"--variants {args.variants!r} names none of {list(VARIANTS)}")
    from flows._common import resolve_store_root

    store = resolve_store_root(args.store)
    start = time.time()
    method, trainer = overrides(args.method), overrides(args.trainer)
    out = ablation_flow(args.toy_n, args.steps, weights, args.prompts, store, variants, args.lr, method, trainer)
    res = measure(out, store, weights)
    wall = time.time() - start
    settings = (f"toy world, {args.toy_n} source pairs; student: toy:sd (fine-tuned: "
                f"{distill_params(args.steps, 0, None, method).method.finetune_steps} steps) CFG-aware 16 -> 8, {args.steps} steps, "
                f"lr {args.lr if args.lr is not None else DistillParams().trainer.lr:g}, "
                f"data_loss_weight {', '.join(f'{w:g}' for w in weights)}"
                f"{''.join(f', {k} {v}' for k, v in {**method, **trainer}.items())}; evaluated with DPM-Solver++ 8 steps (teacher "
                f"{' and '.join(map(str, TEACHER_STEPS))}), "
                f"guidance 7.5, {args.prompts} held-out prompts ({max(1, args.prompts // 4)} per HPSv2 style); "
                f"wall {wall:.0f} s")
    print(settings)
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in out["timings"].items()))
    print(tables(res, weights), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "wall_s": wall, **out, **res}, indent=1,
                                              default=str))


if __name__ == "__main__":
    main()
