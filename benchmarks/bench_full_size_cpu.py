"""An SD-1.5-sized distillation run on the CPU: the real component configs and the real code path at full size.

    .venv/bin/python benchmarks/bench_full_size_cpu.py                       # 64 px, 2 bf16 training steps (~4.5 min)
    .venv/bin/python benchmarks/bench_full_size_cpu.py --resolution 128 --work /tmp/sd15-run

A pipeline in SD 1.5's architecture with random weights (``sd_distill.tiny.sd15``: UNet 320/640/1280/1280 with
cross-attention 768, the SD VAE, CLIP ViT-L/14's text tower) goes through what a real run does:

  build    the pipeline folder (safetensors), as a downloaded SD 1.5 would be on disk
  cache    ``cache_latents`` on a few curated rows (VAE + text encoder, once)
  train    ``train_phase``: cfg_aware 16 -> 8 (the default method: half the states on the teacher's path), bf16
           autocast, gradient checkpointing, fp32 student + AdamW, the frozen teacher UNet in bf16
  export   ``export_student`` -> a stock diffusers folder
  sample   ``StableDiffusionPipeline.from_pretrained`` on that folder in bf16, DDIM 2 steps, guidance 7.5

Each phase runs in its own process, so each peak RSS is that phase's alone. Prints one line per phase
(seconds, peak RSS in GiB) and a table at the end. The small sample size keeps CPU time down; the weights,
optimizer state and their dtypes -- what the memory plan is about -- are SD 1.5's at any resolution.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("build", "cache", "train", "export", "sample")
PROMPTS = ["a red circle above a blue square", "a green square on white", "a photo of a cat", "a yellow triangle"]


def write_curated(folder: Path, resolution: int, n: int = 4) -> None:
    """``n`` curated rows (the columns ``read_curated`` checks) of synthetic images at ``resolution``."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from sd_distill.curate.schema import CAPTIONED_SCHEMA

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        yy, xx = np.mgrid[0:resolution, 0:resolution]
        arr = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256, ((xx + yy) * (i + 2)) % 256], -1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        image = buf.getvalue()
        rows.append({"key": f"bench-{i:05d}", "source": "bench", "url": f"bench://{i}", "local_path": None,
                     "caption_original": PROMPTS[i % len(PROMPTS)], "extra": None, "image": image,
                     "width": resolution, "height": resolution, "sha256": hashlib.sha256(image).hexdigest(),
                     "hps_score": 0.25, "hps_version": "v2.1", "caption": PROMPTS[i % len(PROMPTS)],
                     "caption_source": "original", "caption_reason": None})
    pq.write_table(pa.Table.from_pylist(rows, schema=CAPTIONED_SCHEMA), folder / "part-00000.parquet")


def params_for(work: Path, args):
    from sd_distill.distill.config import DistillParams

    return DistillParams.model_validate({
        "teacher": str(work / "sd15"),
        "trainer": {"max_steps": args.steps, "batch_size": args.batch_size, "mixed_precision": "bf16",
                    "gradient_checkpointing": True, "checkpoint_every": args.steps, "log_every": 1, "device": "cpu",
                    "lr": 1e-5},
        "data": {"resolution": args.resolution, "cache_dtype": "bfloat16", "cache_batch_size": 2},
    })


def run_phase(name: str, work: Path, args) -> dict:
    """One phase in this process; returns what it did."""
    import torch

    torch.set_num_threads(args.threads)
    if name == "build":
        from sd_distill.tiny.sd15 import build_sd15_pipeline

        pipe = build_sd15_pipeline(work / "sd15", words=" ".join(PROMPTS).split())
        return {k: round(sum(p.numel() for p in getattr(pipe, k).parameters()) / 1e6, 1)
                for k in ("unet", "vae", "text_encoder")}
    params = params_for(work, args)
    if name == "cache":
        from sd_distill.distill.data import cache_latents

        write_curated(work / "curated", args.resolution)
        return cache_latents(params, work / "curated", work / "cache")
    if name == "train":
        from sd_distill.distill.methods import plan_phases
        from sd_distill.distill.trainer import train_phase

        out = train_phase(params, plan_phases(params.method)[0], work / "cache", work / "phase", resume=False)
        return {k: out[k] for k in ("steps", "final_loss", "samples_per_s", "skipped_steps")}
    if name == "export":
        from sd_distill.distill.export import export_student

        out = export_student(params, [work / "phase"], work / "student")
        return {k: out[k] for k in ("student_steps", "prediction_type")}
    if name == "sample":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(work / "student"), torch_dtype=torch.bfloat16)
        images = pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=7.5, height=args.resolution,
                      width=args.resolution, output_type="np", generator=torch.Generator().manual_seed(0)).images
        return {"images": int(images.shape[0]), "finite": bool((images == images).all()),
                "scheduler": type(pipe.scheduler).__name__, "clip_sample": pipe.scheduler.config.clip_sample}
    raise ValueError(f"unknown phase {name!r}; valid: {list(PHASES)}")


def child(args) -> None:
    t0 = time.perf_counter()
    info = run_phase(args.phase, Path(args.work), args)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print("RESULT " + json.dumps({"phase": args.phase, "seconds": round(time.perf_counter() - t0, 1),
                                  "peak_rss_gib": round(peak_gib, 2), "info": info}, default=str), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=64, help="pixels (latents are resolution / 8)")
    p.add_argument("--steps", type=int, default=2, help="bf16 training steps")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: run one phase in this process
    args = p.parse_args()
    if args.phase:
        child(args)
        return
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="sd15-cpu-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for name in PHASES:
            cmd = [sys.executable, __file__, "--phase", name, "--work", str(work), "--resolution", str(args.resolution),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
                raise SystemExit(f"phase {name} failed (exit {out.returncode})")
            results.append(json.loads(lines[-1][len("RESULT "):]))
            r = results[-1]
            print(f"{name:7s} {r['seconds']:8.1f} s  peak RSS {r['peak_rss_gib']:6.2f} GiB  {r['info']}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\nSD-1.5-sized run on the CPU, {args.resolution} px, batch {args.batch_size}, {args.steps} bf16 steps, "
          f"{args.threads} threads")
    print("| phase | seconds | peak RSS (GiB) |\n|---|---|---|")
    for r in results:
        print(f"| {r['phase']} | {r['seconds']} | {r['peak_rss_gib']} |")


if __name__ == "__main__":
    main()
