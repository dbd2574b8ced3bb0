"""How far distillation settings move the toy student from its teacher's trajectory (paired, same noise).

    .venv/bin/python benchmarks/bench_toy_distill.py [--store runs/store] [--curated latest] [--prompts 64] \
        '{}' '{"method": {"loss_space": "endpoint"}}' '{"trainer": {"ema_decay": 0.99}}' ...

Each positional argument is a JSON override of ``DistillParams`` (teacher ``toy:sd`` unless it names
another). The distill flow runs once per override (a stage already in the store is reused), on the curated
stage ``--curated`` (a folder, or ``latest`` in ``--store``; ``make demo`` leaves one). Then, on held-out toy
prompts with one fixed seed per prompt, it prints pixel RMSE between:

* DDIM 8 steps and the *teacher's* DDIM 16 steps (trailing grid), guidance 7.5 and 1: what CFG-aware
  16 -> 8 distillation trains the student for (the teacher's own 8 steps are the bar);
* DPM-Solver++ 8 steps and the teacher's DPM-Solver++ 20 steps, guidance 7.5: evaluate's sampler, here on the
  trailing grid for teacher and student alike (evaluate keeps each model's own grid: leading for ``toy:sd``).

A first line gives the teacher's own figures. Use it to choose settings before a full evaluate run: these
distances need no metric model and take about a minute per setting after training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from prefect import flow  # noqa: E402

from sd_distill.toy.measures import paired_rmse  # noqa: E402

from flows.distill import distill  # noqa: E402
from sd_distill.distill.config import DistillParams  # noqa: E402


def prompts(n: int) -> list[str]:
    """The toy world's held-out COCO-format prompts (the evaluate stage's own set), first caption per image."""
    from sd_distill.evaluate.prompts import load_coco_prompts
    from sd_distill.toy.sources import make_eval_prompts

    paths = make_eval_prompts(tempfile.mkdtemp(prefix="bench-toy-distill-"), n=n)
    return load_coco_prompts(str(paths["coco_captions"]), None, n).prompts[:n]


def load(ref: str):
    from diffusers import StableDiffusionPipeline

    from sd_distill.modelref import resolve_model_ref

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_ref(ref), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, scheduler_config: dict, texts: list[str], steps: int, guidance: float, sampler: str) -> torch.Tensor:
    from diffusers import DDIMScheduler

    from sd_distill.evaluate.generate import dpm_solver_pp_scheduler

    ddim = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing")
    pipe.scheduler = ddim if sampler == "ddim" else dpm_solver_pp_scheduler(ddim)
    gens = [torch.Generator().manual_seed(i) for i in range(len(texts))]
    out = pipe(texts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np").images
    return torch.from_numpy(out)


def distances(pipe, refs: dict, scheduler_config: dict, texts: list[str]) -> dict[str, float]:
    return {"ddim8_gs7.5": paired_rmse(generate(pipe, scheduler_config, texts, 8, 7.5, "ddim"), refs["ddim16_gs7.5"]),
            "ddim8_gs1": paired_rmse(generate(pipe, scheduler_config, texts, 8, 1.0, "ddim"), refs["ddim16_gs1"]),
            "dpm8_gs7.5": paired_rmse(generate(pipe, scheduler_config, texts, 8, 7.5, "dpm"), refs["dpm20_gs7.5"])}


@flow(name="bench-toy-distill")
def distill_flow(params: DistillParams, curated: str, store: str):
    return distill(params=params, curated=curated, store_root=store)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", default=["{}"], help="DistillParams overrides as JSON (default: '{}')")
    ap.add_argument("--store", default="runs/store", help="stage store root (default runs/store)")
    ap.add_argument("--curated", default="latest", help="curated stage folder, or 'latest' in --store")
    ap.add_argument("--prompts", type=int, default=64, help="held-out toy prompts (default 64)")
    args = ap.parse_args()
    torch.manual_seed(0)

    configs = [DistillParams.model_validate(json.loads(o)) for o in args.overrides]  # bad JSON fails before work
    texts = prompts(args.prompts)
    teachers: dict[str, tuple] = {}

    def teacher_refs(ref: str):
        if ref not in teachers:
            pipe = load(ref)
            cfg = dict(pipe.scheduler.config)
            refs = {"ddim16_gs7.5": generate(pipe, cfg, texts, 16, 7.5, "ddim"),
                    "ddim16_gs1": generate(pipe, cfg, texts, 16, 1.0, "ddim"),
                    "dpm20_gs7.5": generate(pipe, cfg, texts, 20, 7.5, "dpm")}
            teachers[ref] = (cfg, refs)
            row(f"teacher {ref}", distances(pipe, refs, cfg, texts), 0.0)
        return teachers[ref]

    def row(name: str, d: dict, seconds: float) -> None:
        print(f"{name:60s} DDIM8->teacher DDIM16: gs7.5 {d['ddim8_gs7.5']:.4f} gs1 {d['ddim8_gs1']:.4f} | "
              f"DPM++8->teacher DPM++20 {d['dpm8_gs7.5']:.4f} | {seconds:.0f} s", flush=True)


    print(f"{len(texts)} held-out toy prompts, one seed each; pixel RMSE, lower is closer", flush=True)
    for override, params in zip(args.overrides, configs):
        cfg, refs = teacher_refs(params.teacher)
        start = time.time()
        student = distill_flow(params, args.curated, args.store)
        row(f"student {override}", distances(load(str(student.path)), refs, cfg, texts), time.time() - start)


if __name__ == "__main__":
    main()
