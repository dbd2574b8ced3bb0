"""Distillation training throughput: samples/s, peak memory and (on a GPU) MFU of one training step.

    .venv/bin/python benchmarks/bench_distill.py --seconds 30                 # tiny toy-sized UNet, CPU
    python benchmarks/bench_distill.py --gpu --seconds 240                    # SD-1.5-sized UNet, bf16, H100

A step is exactly what ``train_phase`` runs per micro-batch: the method's loss (teacher DDIM steps without
gradients + the student's forward), backward, gradient clip, AdamW step, with fp32 trainable weights under
autocast. Models are built here, randomly initialised (random weights cost the same compute as trained ones):

- CPU mode: the tiny test UNet (``sd_distill.tiny.sd.tiny_unet``: 8x8x4 latents, 77x32 text), fp32.
- ``--gpu``: ``UNet2DConditionModel`` in SD-1.5's configuration (block_out_channels 320/640/1280/1280,
  cross_attention_dim 768, 8 heads; 860M parameters) on 64x64x4 latents with 77x768 text, bf16 autocast,
  gradient checkpointing off and on. No diffusers weights are needed.

FLOPs per step are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one step with gradient
checkpointing off (matmuls, convolutions, attention: teacher forwards + student forward and backward), so the
recomputation of checkpointing is not counted (model FLOPs utilisation). MFU = FLOPs/step x steps/s / peak,
with the card's dense bf16 peak (H100/H200 SXM: 989 TFLOPS; override with ``--peak-tflops``).

Measured once, before the CFG and conditional teacher trajectories shared a forward (cfg_aware 16 -> 8, epsilon
teacher, batch 4, bf16, 30 s budget), NVIDIA H100 80GB HBM3:
39.0 TFLOP/step (~12 UNet forward-equivalents per sample: 6 teacher forwards, student forward on 2B + backward);
checkpointing off 12.1 samples/s, 118 TFLOPS, MFU 12.0 %, 22.4 GiB peak; on 9.2 samples/s, MFU 9.1 %, 17.8 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd_distill.diffusion.schedule import NoiseSchedule  # noqa: E402
from sd_distill.distill.methods import MethodConfig, build_method, make_student, plan_phases  # noqa: E402
from sd_distill.distill.teacher import Teacher  # noqa: E402
from sd_distill.distill.trainer import use_sdpa  # noqa: E402
from sd_distill.tiny.sd import ddim_scheduler, tiny_unet  # noqa: E402
from sd_distill.tiny.sd15 import SD15_UNET  # noqa: E402

PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "4090": 165.2}

def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return value
    return None


def build(args, device):
    """(method, optimizer, batch, generator, latent description) for the chosen scale."""
    from diffusers import UNet2DConditionModel

    sched = ddim_scheduler(args.prediction_type)
    if args.gpu:
        torch.manual_seed(0)
        with torch.device(device):  # random init on the GPU: seconds, not the CPU's half minute
            teacher_unet = UNet2DConditionModel(**SD15_UNET)
        latent, text = (4, 64, 64), (77, 768)
    else:
        teacher_unet = tiny_unet(cross_attention_dim=32, sample_size=8)
        latent, text = (4, 8, 8), (77, 32)
    extra = {} if getattr(args, "trajectory_fraction", None) is None else {"trajectory_fraction": args.trajectory_fraction}
    cfg = MethodConfig(kind=args.method, teacher_steps=args.teacher_steps, student_steps=args.student_steps,
                       progressive_start_steps=args.teacher_steps, **extra)
    phase = plan_phases(cfg)[0]
    student = make_student(cfg, teacher_unet, phase).to(device, torch.float32).train().requires_grad_(True)
    teacher_unet = teacher_unet.to(device, args.dtype).eval().requires_grad_(False)
    for unet in (student, teacher_unet):
        use_sdpa(unet)
    teacher = Teacher(unet=teacher_unet, vae=None, text_encoder=None, tokenizer=None, scheduler=sched,
                      prediction_type=args.prediction_type, alphas_cumprod=sched.alphas_cumprod.float(),
                      schedule=NoiseSchedule.from_scheduler(sched))
    method = build_method(cfg, phase, teacher, teacher_unet, student)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator(device=device).manual_seed(0)
    b = args.batch_size
    batch = {"latents": torch.randn(b, *latent, device=device, generator=g),
             "prompt_embeds": torch.randn(b, *text, device=device, generator=g),
             "negative_embeds": torch.randn(1, *text, device=device, generator=g).expand(b, -1, -1)}
    n_params = sum(p.numel() for p in student.parameters())
    return method, optimizer, batch, g, f"{latent[1]}x{latent[2]}x{latent[0]} latents, {text[0]}x{text[1]} text", n_params


def train_step(method, optimizer, batch, generator, dtype, device) -> float:
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = method.loss(batch, generator)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(method.student.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_step(method, optimizer, batch, generator, dtype, device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(method, optimizer, batch, generator, dtype, device)
    return int(counter.get_total_flops())


def measure(args, device, checkpointing: bool, seconds: float, flops: int | None) -> tuple[dict, int | None]:
    """Time one configuration; FLOPs are counted once, before checkpointing is switched on."""
    method, optimizer, batch, g, shape, n_params = build(args, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(args.warmup):
            train_step(method, optimizer, batch, g, args.dtype, device)
        if flops is None:
            flops = flops_per_step(method, optimizer, batch, g, args.dtype, device)
        if checkpointing:
            method.student.enable_gradient_checkpointing()
            train_step(method, optimizer, batch, g, args.dtype, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        steps, t0 = 0, time.perf_counter()
        while steps < args.min_steps or time.perf_counter() - t0 < seconds:
            train_step(method, optimizer, batch, g, args.dtype, device)
            steps += 1
        sync(device)
        elapsed = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError as exc:
        return {"gradient_checkpointing": checkpointing, "error": f"out of memory: {str(exc).splitlines()[0]}"}, flops
    out = {
        "gradient_checkpointing": checkpointing, "batch_size": args.batch_size, "steps": steps,
        "samples_per_s": round(steps * args.batch_size / elapsed, 3), "s_per_step": round(elapsed / steps, 4),
        "student_params_M": round(n_params / 1e6, 1), "shapes": shape,
        "gflop_per_step": round(flops / 1e9, 1), "achieved_tflops": round(flops * steps / elapsed / 1e12, 3),
    }
    if device.type == "cuda":
        out["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:  # process-wide high-water mark (covers every configuration run so far)
        out["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    if args.peak:
        out["mfu"] = round(flops * steps / elapsed / 1e12 / args.peak, 4)
    del method, optimizer, batch
    return out, flops


def loop_benchmark(args, device) -> dict:
    """The real ``train_phase`` (accelerate, hooks, cache reads) on the tiny teacher: samples/s of the whole loop."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _fixtures_distill import WORDS, tiny_params, write_tiny_curated

    from sd_distill.distill.data import build_latent_cache
    from sd_distill.distill.trainer import train_phase
    from sd_distill.tiny.sd import build_tiny_sd_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tiny_sd_pipeline(tmp / "teacher", words=WORDS)
        write_tiny_curated(tmp / "curated", n=32)
        build_latent_cache(str(tmp / "teacher"), tmp / "curated", tmp / "cache", 32, 16, dtype="float32",
                           device=device.type)
        precision = args.precision_name
        params = tiny_params(tmp / "teacher", method={"kind": args.method, "teacher_steps": args.teacher_steps,
                                                      "student_steps": args.student_steps,
                                                      "progressive_start_steps": args.teacher_steps},
                             max_steps=args.loop_steps, batch_size=args.batch_size, checkpoint_every=args.loop_steps,
                             log_every=args.loop_steps, device=device.type, mixed_precision=precision,
                             gradient_checkpointing=args.checkpointing == "on", ema_decay=0.999)
        from sd_distill.distill.methods import plan_phases

        out = train_phase(params, plan_phases(params.method)[0], tmp / "cache", tmp / "phase")
        return {"loop": "train_phase", "steps": out["steps"], "samples_per_s": out["samples_per_s"],
                "final_loss": out["final_loss"], "precision": precision}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="SD-1.5-sized UNet on CUDA, bf16 (default: tiny UNet on CPU)")
    p.add_argument("--seconds", type=float, default=30.0, help="total timing budget, split over the configurations")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default 8 GPU, 8 CPU)")
    p.add_argument("--method", default="cfg_aware", choices=["cfg_aware", "progressive", "w_conditioned"])
    p.add_argument("--teacher-steps", type=int, default=16)
    p.add_argument("--student-steps", type=int, default=8)
    p.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "sample", "v_prediction"])
    p.add_argument("--precision", default=None, choices=["no", "bf16", "fp16"],
                   help="default: bf16 on GPU, no on CPU; fp16 (GradScaler) only with --loop")
    p.add_argument("--checkpointing", default="both", choices=["off", "on", "both"])
    p.add_argument("--peak-tflops", type=float, default=None, help="card's dense bf16 peak (default: by name)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU mode)")
    p.add_argument("--loop", action="store_true", help="time the real train_phase loop on the tiny teacher instead")
    p.add_argument("--loop-steps", type=int, default=30, help="optimizer steps of --loop")
    args = p.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA; run without --gpu for the CPU benchmark")
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch_size = args.batch_size or 8
    precision = args.precision or ("bf16" if args.gpu else "no")
    if precision == "fp16" and not args.loop:
        sys.exit("--precision fp16 needs --loop (the step benchmark has no GradScaler)")
    args.precision_name = precision
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    name = torch.cuda.get_device_name() if args.gpu else f"CPU ({torch.get_num_threads()} threads)"
    args.peak = peak_tflops(name, args.peak_tflops) if args.gpu else args.peak_tflops
    if args.gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    print(json.dumps({"device": name, "method": args.method, "teacher_steps": args.teacher_steps,
                      "student_steps": args.student_steps, "precision": precision, "peak_tflops_assumed": args.peak,
                      "flops": "FlopCounterMode, one step, checkpointing off (model FLOPs)"}), flush=True)
    if args.loop:
        print(json.dumps(loop_benchmark(args, device)), flush=True)
        return
    flops = None
    for ckpt in modes:
        result, flops = measure(args, device, ckpt, args.seconds / len(modes), flops)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
