"""Images/s of evaluation-style generation, teacher (CFG) vs student (w-conditioned), and FID feature throughput.

Both run DPM-Solver++ at guidance 7.5 through a stock diffusers StableDiffusionPipeline, text encoding
and VAE decoding included. The teacher's CFG calls the UNet on the doubled batch (2 evaluations per
step); the w-conditioned student (``time_cond_proj_dim`` set) takes the guidance as an embedding
(1 evaluation per step).

    python benchmarks/bench_evaluate.py                  # CPU: tiny pipelines at 32 px (or --teacher/--student refs)
    python benchmarks/bench_evaluate.py --gpu --seconds 120   # SD-1.5-sized random models, 512 px, fp16
    python benchmarks/bench_evaluate.py --gpu --dtype bf16 --steps 8 16 20   # both models at every step count

Each model runs at each ``--steps`` count (default: teacher 20, student 8). The FID row is the FID InceptionV3
(random weights: the same compute) on generated-size images, resized to 299 px inside, as the evaluate stage
extracts features. ``benchmarks/device_gpu_speed.py`` calls these functions for its one-call device run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from sd_distill.evaluate.generate import UNetEvalCounter, dpm_solver_pp_scheduler, load_pipeline, prompt_generators
from sd_distill.evaluate.speed import unet_macs_per_eval, unet_parameters

PROMPTS = ["a red circle above a blue square", "a green triangle", "a photo of a cat", "a painting of a lighthouse"]


def sd15_sized_pipeline(device: torch.device, dtype: torch.dtype, time_cond_proj_dim: int | None):
    """A StableDiffusionPipeline with SD-1.5's architecture (UNet 860M, VAE, CLIP ViT-L text encoder), random weights."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sd_distill.tiny.sd import ddim_scheduler, write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, PROMPTS[0].split()))
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, time_cond_proj_dim=time_cond_proj_dim)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=dpm_solver_pp_scheduler(ddim_scheduler("epsilon")), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def fid_features_per_second(device: torch.device, batch: int, resolution: int, seconds: float) -> dict:
    """Images/s of FID feature extraction (``FIDInceptionV3.features`` on [batch, 3, res, res] images in [0, 1]),
    in fp32 as the evaluate stage runs it (the TF-FID graph it reproduces is fp32)."""
    import statistics

    from sd_distill.evaluate.metrics.inception import FIDInceptionV3

    model = FIDInceptionV3().eval().to(device)
    images = torch.rand(batch, 3, resolution, resolution, device=device)
    times: list[float] = []
    with torch.inference_mode():
        model.features(images)  # warm-up
        start = time.perf_counter()
        while len(times) < 3 or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            model.features(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return {"images_per_s": batch / statistics.median(times), "batches": len(times)}


def tiny_pipelines(folder: str):
    """Tiny teacher (epsilon, CFG) and w-conditioned student folders built with sd_distill.tiny.sd."""
    from sd_distill.tiny.sd import build_tiny_sd_pipeline

    words = sorted({w for p in PROMPTS for w in p.split()})
    build_tiny_sd_pipeline(f"{folder}/teacher", words=words, seed=0)
    build_tiny_sd_pipeline(f"{folder}/student", words=words, time_cond_proj_dim=32, seed=0)
    return f"{folder}/teacher", f"{folder}/student"


def interleaved_images_per_second(runs: list[tuple], batch: int, resolution: int, seconds: float,
                                  device: torch.device) -> list[dict]:
    """Images/s of each (pipe, steps) from the median batch time, batches interleaved round by round.

    One warm-up batch each; then rounds of one timed batch per run until ``seconds`` have passed (at
    least three rounds). Interleaving and the median keep a shared, busy machine's noise out of the ratio.
    """
    import statistics

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

    def run(pipe, steps) -> float:
        start = time.perf_counter()
        pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=7.5, height=resolution, width=resolution,
             generator=prompt_generators(0, list(range(batch))), output_type="pt")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: list[list[float]] = [[] for _ in runs]
    counters = [UNetEvalCounter(pipe.unet) for pipe, _ in runs]
    with torch.inference_mode():
        for pipe, steps in runs:
            run(pipe, steps)
        start = time.perf_counter()
        while len(times[0]) < 3 or time.perf_counter() - start < seconds:
            for k, (pipe, steps) in enumerate(runs):
                with counters[k]:
                    times[k].append(run(pipe, steps))
    return [{"images_per_s": batch / statistics.median(t), "unet_evals": c.evals / (len(t) * batch), "batches": len(t)}
            for t, c in zip(times, counters)]


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="SD-1.5-sized random models, 512 px, on CUDA")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="GPU mode: pipeline dtype")
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="step counts for both models (default: teacher 20, student 8)")
    ap.add_argument("--seconds", type=float, default=20.0, help="timing budget after warm-up (at least 3 rounds)")
    ap.add_argument("--batch", type=int, default=None, help="images per pipeline call (default 4 GPU, 8 CPU)")
    ap.add_argument("--teacher", default=None, help="CPU mode: teacher pipeline ref (default: a tiny one)")
    ap.add_argument("--student", default=None, help="CPU mode: student pipeline ref (default: a tiny w-conditioned one)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default 512 GPU, 32 CPU)")
    args = ap.parse_args()

    torch.manual_seed(0)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs CUDA")
        device, res, batch = torch.device("cuda"), args.resolution or 512, args.batch or 4
        teacher = sd15_sized_pipeline(device, DTYPES[args.dtype], None)
        student = sd15_sized_pipeline(device, DTYPES[args.dtype], 256)
        label = f"SD-1.5-sized random init, {res} px, {args.dtype}, {torch.cuda.get_device_name()}"
    else:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
        device, res, batch = torch.device("cpu"), args.resolution or 32, args.batch or 8
        tmp = tempfile.mkdtemp()
        t_ref, s_ref = (args.teacher, args.student) if args.teacher and args.student else tiny_pipelines(tmp)
        teacher, student = load_pipeline(t_ref, "cpu"), load_pipeline(s_ref, "cpu")
        label = f"CPU ({torch.get_num_threads()} threads), {res} px, fp32, teacher={t_ref} student={s_ref}"
    print(f"# bench_evaluate: {label}; DPM-Solver++, guidance 7.5, batch {batch}")
    runs = ([("teacher (CFG)", teacher, n) for n in args.steps] + [("student (w-cond)", student, n) for n in args.steps]
            if args.steps else [("teacher (CFG)", teacher, 20), ("student (w-cond)", student, 8)])
    rows = interleaved_images_per_second([(p, n) for _, p, n in runs], batch, res, args.seconds, device)
    for r, (name, pipe, steps) in zip(rows, runs):
        r.update(name=name, steps=steps, params_m=unet_parameters(pipe.unet) / 1e6,
                 gmacs=unet_macs_per_eval(pipe, res) * r["unet_evals"] / 1e9)
    print("| model | steps | UNet evals/img | UNet params M | UNet GMACs/img | img/s (median batch) | batches timed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['steps']} | {r['unet_evals']:.0f} | {r['params_m']:.1f} | {r['gmacs']:.1f} | "
              f"{r['images_per_s']:.3f} | {r['batches']} |")
    fid = fid_features_per_second(device, 64 if args.gpu else 4, res, min(args.seconds, 10.0))
    print(f"FID InceptionV3 features (fp32, {res} px inputs): {fid['images_per_s']:.1f} images/s")
    if not args.steps:
        print(f"speed-up student / teacher: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x "
              f"(UNet evaluations {rows[0]['unet_evals']:.0f} -> {rows[1]['unet_evals']:.0f} per image)")


if __name__ == "__main__":
    main()
