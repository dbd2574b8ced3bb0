"""One call on a lent GPU: the distill-step sweep, HPS scoring images/s and the evaluate figures, one table.

    python benchmarks/device_gpu_speed.py              # CUDA: SD-1.5-size random models, ~7 minutes on an H100/H200
    .venv/bin/python benchmarks/device_gpu_speed.py --smoke   # the same code on the CPU, tiny sizes, seconds

What it measures (random weights cost the compute of trained ones; nothing is downloaded):

1. Distill step (cfg_aware 16 -> 8, epsilon teacher, bf16 autocast, fp32 student weights, 64x64x4 latents): the
   step the trainer runs with its speed options (``sd_distill.distill.speed``: fused AdamW, the NaN guard on the
   device with the skip inside the fused AdamW, channels_last, torch.compile regional / full) over batch size x
   gradient checkpointing x compile x channels_last. ``trajectory_fraction`` is 0 so every step has the same
   shapes (trajectory states vary the teacher's row count, which recompiles). FLOPs per sample are counted once
   with ``FlopCounterMode`` on an eager step (teacher forwards included, checkpointing's recomputation not);
   MFU = FLOPs/s / the card's dense bf16 peak (``bench_distill.PEAK_BF16_TFLOPS``). Host syncs inside timed
   steps are counted with ``torch.cuda.set_sync_debug_mode("warn")``.
2. HPS: ViT-H-14 (random), bf16 weights, 512x384 images preprocessed in DataLoader workers, batch sizes 64 / 128 /
   256: images/s; and the largest |bf16 - fp32| score difference on 64 images.
3. Evaluate: SD-1.5-size teacher (CFG) and w-conditioned student, DPM-Solver++ at 8 / 16 / 20 steps, 512 px, bf16
   and fp16: images/s (``bench_evaluate.interleaved_images_per_second``); FID InceptionV3 features images/s (fp32, as the stage runs it).

A time budget (``--budget``, default 400 s; the torch.compile rows run last) skips what no longer fits and says so in the table.

On the device machine (diffusers, open_clip and pydantic are not installed there; carry them as wheels). Here,
once, in the repository root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
      diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 importlib_metadata==10.2.0 \\
      pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5

then one ``run`` (carry ``[".whl"]``, timeout_s 560):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
      .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; PYTHONUNBUFFERED=1 \\
      python3 benchmarks/device_gpu_speed.py --json $OUT/gpu_speed.json 2>&1 | tee $OUT/gpu_speed.log
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_distill  # noqa: E402
import bench_evaluate  # noqa: E402
import bench_scoring  # noqa: E402

from sd_distill.distill.config import TrainerConfig  # noqa: E402
from sd_distill.distill.hooks.nan_guard import DeviceNanGuard, NanGuard  # noqa: E402
from sd_distill.distill.speed import compile_unet, make_adamw, skip_step_on_device, to_channels_last  # noqa: E402


class Table:
    """Rows of (section, configuration, figure, value); printed once at the end."""

    def __init__(self, budget_s: float):
        self.rows: list[dict] = []
        self.t0, self.budget = time.perf_counter(), budget_s

    def add(self, section: str, config: str, **figures) -> None:
        self.rows.append({"section": section, "config": config, **figures})
        print(json.dumps(self.rows[-1]), flush=True)  # progress, in case the call is cut short

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def fits(self, section: str, config: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.add(section, config, skipped=f"time budget ({self.left():.0f} s left, ~{need_s:.0f} s needed)")
        return False

    def print(self, card: str) -> None:
        keys = [k for r in self.rows for k in r if k not in ("section", "config")]
        keys = list(dict.fromkeys(keys))
        print(f"\n# device_gpu_speed on {card} ({time.perf_counter() - self.t0:.0f} s)")
        print("| section | config | " + " | ".join(keys) + " |")
        print("|---|---|" + "---|" * len(keys))
        for r in self.rows:
            print(f"| {r['section']} | {r['config']} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- 1. distill step ------------------------------------------------------------------------------------------
def distill_step(method, optimizer, guard, batch, generator, dtype, device, step: int) -> None:
    """The trainer's lazy step: loss, backward, clip, device-side guard, fused AdamW that skips a bad step."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = method.loss(batch, generator)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(method.student.parameters(), 1.0)
    skip_step_on_device(optimizer, guard.step(step, loss.detach().float(), norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def distill_config(args, device, batch_size: int, checkpointing: bool, compile_how: str, channels_last: bool,
                   flops_per_sample: float | None, seconds: float) -> dict:
    ns = SimpleNamespace(gpu=not args.smoke, prediction_type="epsilon", method="cfg_aware", teacher_steps=16,
                         student_steps=8, dtype=torch.bfloat16 if not args.smoke else torch.float32,
                         batch_size=batch_size, trajectory_fraction=0.0)
    method, _, batch, g, _, _ = bench_distill.build(ns, device)
    if checkpointing:
        method.student.enable_gradient_checkpointing()
    for unet in (method.student, method.teacher_unet):
        if channels_last:
            to_channels_last(unet)
        compile_unet(unet, compile_how, backend=args.backend)
    trainable = [p for p in method.student.parameters() if p.requires_grad]
    optimizer = make_adamw(trainable, TrainerConfig(lr=1e-5), device, lazy_guard=True)
    guard = DeviceNanGuard(NanGuard(), device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = 0
    try:
        t_compile = time.perf_counter()
        for _ in range(args.warmup):
            step += 1
            distill_step(method, optimizer, guard, batch, g, ns.dtype, device, step)
        sync(device)
        warmup_s = time.perf_counter() - t_compile
        if flops_per_sample is None:  # counted on an eager, non-checkpointed step (see the module docstring)
            flops_per_sample = bench_distill.flops_per_step(method, torch.optim.AdamW(trainable, lr=0.0), batch, g,
                                                            ns.dtype, device) / batch_size
        syncs = []
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            steps, t0 = 0, time.perf_counter()
            while steps < args.min_steps or time.perf_counter() - t0 < seconds:
                step += 1
                distill_step(method, optimizer, guard, batch, g, ns.dtype, device, step)
                steps += 1
            sync(device)
            elapsed = time.perf_counter() - t0
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory", "flops_per_sample": flops_per_sample}
    out = {"samples_per_s": round(steps * batch_size / elapsed, 2), "warmup_s": round(warmup_s, 1),
           "tflops": round(flops_per_sample * steps * batch_size / elapsed / 1e12, 2),
           "host_syncs_per_step": round(len(syncs) / steps, 2), "flops_per_sample": flops_per_sample}
    if device.type == "cuda":
        out["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        if args.peak:
            out["mfu_%"] = round(100 * out["tflops"] / args.peak, 1)
    del method, optimizer, batch
    return out


def distill_sweep(args, device, table: Table, flops: dict, compiled: bool) -> None:
    """Eager: batch size x gradient checkpointing, and channels_last; ``compiled``: the torch.compile rows (run last,
    in what is left of the budget: their warm-up includes the compilation)."""

    def one(b: int, ckpt: bool, how: str, cl: bool, need_s: float) -> None:
        name = f"batch {b}, ckpt {'on' if ckpt else 'off'}, compile {how}, channels_last {'on' if cl else 'off'}"
        if not table.fits("distill step", name, need_s):
            return
        r = distill_config(args, device, b, ckpt, how, cl, flops.get(b), args.seconds)
        flops[b] = flops.get(b) or r.pop("flops_per_sample")
        r.pop("flops_per_sample", None)
        table.add("distill step", name, **r)

    mid = args.batch_sizes[min(1, len(args.batch_sizes) - 1)]  # the options are compared at a mid-size batch
    need = args.need_s  # a configuration's expected seconds: build, warm-up (compilation), timing
    if not compiled:
        for b in args.batch_sizes:
            for ckpt in (False, True):
                one(b, ckpt, "off", False, need["off"])
        one(mid, False, "off", True, need["off"])
    else:
        one(mid, False, "regional", True, need["regional"])
        one(mid, False, "full", True, need["full"])


# --- 2. HPS ---------------------------------------------------------------------------------------------------
def hps_figures(args, device, table: Table) -> None:
    from sd_distill.scoring.hps import load_hps_scorer

    if not table.fits("HPS", "ViT-H-14 bf16", args.need_s["hps"]):
        return
    folder = Path(tempfile.mkdtemp())
    with torch.device(device):  # random init on the device: seconds instead of a minute for ViT-H-14 on the CPU
        ckpt, arch = bench_scoring.hps_checkpoint(folder, "tiny" if args.smoke else "vit-h")
    n, px = (16, 64) if args.smoke else (1536, 512)
    images = bench_scoring.random_images(n, px)
    prompts = [f"a photo of object number {i} on a plain background" for i in range(n)]
    dev = device.type
    fast = load_hps_scorer(str(ckpt), arch=arch, device=dev, precision="bf16")
    ref = load_hps_scorer(str(ckpt), arch=arch, device=dev, precision="fp32")
    label = "tiny open_clip" if args.smoke else arch
    k = min(64, n)
    diff = float(np.abs(fast.score(images[:k], prompts[:k], 32) - ref.score(images[:k], prompts[:k], 32)).max())
    del ref
    table.add("HPS", f"{label} bf16 vs fp32, {k} images", max_abs_score_diff=f"{diff:.2e}")
    for b in ((4, 8) if args.smoke else (64, 128, 256)):
        fast.score(images[:b], prompts[:b], b, num_workers=args.workers)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        fast.score(images, prompts, b, num_workers=args.workers)
        sync(device)
        table.add("HPS", f"{label} bf16, batch {b}, {args.workers} workers, {px}x{px * 3 // 4} px",
                  images_per_s=round(n / (time.perf_counter() - t0), 1))


# --- 3. evaluate ----------------------------------------------------------------------------------------------
def evaluate_figures(args, device, table: Table) -> None:
    res, batch, steps = (32, 2, (2, 4)) if args.smoke else (512, 4, (8, 16, 20))
    dtypes = ("fp32",) if args.smoke else ("bf16", "fp16")
    for name in dtypes:
        if not table.fits("evaluate", f"{name} generation", args.need_s["evaluate"]):
            continue
        dtype = bench_evaluate.DTYPES[name]
        if args.smoke:
            folder = tempfile.mkdtemp()
            t_ref, s_ref = bench_evaluate.tiny_pipelines(folder)
            teacher, student = (bench_evaluate.load_pipeline(r, "cpu") for r in (t_ref, s_ref))
        else:
            teacher = bench_evaluate.sd15_sized_pipeline(device, dtype, None)
            student = bench_evaluate.sd15_sized_pipeline(device, dtype, 256)
        runs = [("teacher (CFG)", teacher, n) for n in steps] + [("student (w-cond)", student, n) for n in steps]
        rows = bench_evaluate.interleaved_images_per_second([(p, n) for _, p, n in runs], batch, res,
                                                           0.0 if args.smoke else 15.0, device)
        for (who, _, n), r in zip(runs, rows):
            table.add("evaluate", f"{who}, {n} steps, {name}, {res} px, batch {batch}",
                      images_per_s=round(r["images_per_s"], 2), unet_evals_per_image=round(r["unet_evals"]))
        del teacher, student, runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fid = bench_evaluate.fid_features_per_second(device, 2 if args.smoke else 64, res, 0.0 if args.smoke else 8.0)
    table.add("evaluate", f"FID InceptionV3 features, fp32, {res} px", images_per_s=round(fid["images_per_s"], 1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the code path in seconds")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; configurations that no longer fit are skipped")
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds per distill configuration")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--workers", type=int, default=None, help="HPS preprocessing workers")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--only", nargs="+", choices=("distill", "hps", "evaluate"), default=("distill", "hps", "evaluate"))
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.smoke:
        device, card = torch.device("cpu"), "CPU (smoke: tiny sizes)"
        torch.set_num_threads(1)
        args.backend, args.warmup, args.min_steps = "eager", 1, 1
        args.seconds = 0.0 if args.seconds is None else args.seconds
        args.batch_sizes = args.batch_sizes or [2]
        args.workers = 1 if args.workers is None else args.workers
        args.need_s = {"off": 2, "regional": 8, "full": 20, "hps": 3, "evaluate": 5}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs CUDA (or --smoke)")
        device, card = torch.device("cuda"), torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        args.backend, args.warmup, args.min_steps = "inductor", 3, 5
        args.seconds = 8.0 if args.seconds is None else args.seconds
        args.batch_sizes = args.batch_sizes or [4, 8, 16]
        args.workers = 8 if args.workers is None else args.workers
        args.need_s = {"off": args.seconds + 20, "regional": args.seconds + 120, "full": args.seconds + 180,
                       "hps": 90, "evaluate": 70}
    args.peak = bench_distill.peak_tflops(card, args.peak_tflops)
    table = Table(args.budget)
    torch.manual_seed(0)
    flops: dict[int, float] = {}  # FLOPs per sample, by batch size
    if "distill" in args.only:
        distill_sweep(args, device, table, flops, compiled=False)
    if "hps" in args.only:
        hps_figures(args, device, table)
    if "evaluate" in args.only:
        evaluate_figures(args, device, table)
    if "distill" in args.only:
        distill_sweep(args, device, table, flops, compiled=True)
    table.print(card)
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "peak_tflops": args.peak, "rows": table.rows}, indent=1))


if __name__ == "__main__":
    main()
