"""Throughput of HPSv2 scoring and BLIP captioning, and the batched scorer's speed-up over hpsv2's path.

    .venv/bin/python benchmarks/bench_scoring.py                        # tiny models, CPU (seconds)
    python benchmarks/bench_scoring.py --scale full --device cuda       # ViT-H-14 HPS + BLIP-base sizes

``--scale tiny`` uses the test-sized open_clip / BLIP models; ``--scale full`` builds randomly initialised
models of the real sizes (OpenCLIP ViT-H-14, the HPSv2 architecture; BLIP-base's vision and text towers
with the tiny vocabulary), since no weights can be downloaded here. Random weights cost the same compute
as trained ones; a random captioner never emits its end token, so every caption runs to
``--max-new-tokens`` (the worst case).

The baseline is :class:`sd_distill.scoring.hps_per_call.PerCallHPS`: what ``hpsv2.score`` does per call
(reload the checkpoint from disk, batch size 1), called once per (image, caption) pair as a curation
pass over a dataset of captioned images must.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd_distill.captioning.blip import load_captioner  # noqa: E402
from sd_distill.scoring.hps import HPS_FILES, load_hps_scorer  # noqa: E402
from sd_distill.scoring.hps_per_call import PerCallHPS  # noqa: E402
from sd_distill.tiny.blip import build_tiny_blip  # noqa: E402
from sd_distill.tiny.clip import register_open_clip_config, save_hps_checkpoint, tiny_open_clip_config  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def random_images(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size * 3 // 4, 3), dtype=np.uint8)) for _ in range(n)]


def hps_checkpoint(folder: Path, scale: str) -> tuple[Path, str]:
    """An HPS-style checkpoint of a random model of the chosen size, and the arch to load it with."""
    import open_clip

    if scale == "tiny":
        arch = str(register_open_clip_config("bench-tiny-hps", tiny_open_clip_config(), folder))
        name = "bench-tiny-hps"
    else:
        arch = name = "ViT-H-14"
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    return save_hps_checkpoint(model, folder / HPS_FILES["v2.1"]), arch


def bench_hps(args, folder: Path) -> None:
    ckpt, arch = hps_checkpoint(folder, args.scale)
    images = random_images(args.n_images, args.image_px)
    prompts = [f"a photo of object number {i} on a plain background" for i in range(len(images))]
    load_s, scorer = timed(lambda: load_hps_scorer(str(ckpt), arch=arch, device=args.device,
                                                   precision=args.precision), args.device)
    scorer.score(images[: args.batch_size], prompts[: args.batch_size], args.batch_size)  # warm-up
    batched_s, batched = timed(lambda: scorer.score(images, prompts, args.batch_size), args.device)
    baseline = PerCallHPS(ckpt, arch=arch, device=args.device,
                          precision=args.precision if args.precision.startswith("amp") else "fp32")
    baseline.score(images[:1], prompts[0])  # warm-up
    n_base = min(len(images), args.baseline_images)
    base_s, base = timed(lambda: np.concatenate([baseline.score([im], p) for im, p in
                                                 zip(images[:n_base], prompts[:n_base])]), args.device)
    max_diff = float(np.abs(base - batched[:n_base]).max())
    batched_ips, base_ips = len(images) / batched_s, n_base / base_s
    print(f"HPSv2 scoring ({'tiny open_clip' if args.scale == 'tiny' else 'ViT-H-14'}, {args.device}, "
          f"{args.precision}, {args.image_px}px inputs)")
    print(f"  load once:                      {load_s:8.2f} s")
    print(f"  batched (batch {args.batch_size:3d}):            {batched_ips:8.1f} images/s ({len(images)} images)")
    print(f"  hpsv2-style per-call path:      {base_ips:8.1f} images/s ({n_base} images)")
    print(f"  speed-up:                       {batched_ips / base_ips:8.1f} x   (max |score diff| {max_diff:.2e})")


def bench_captioning(args, folder: Path) -> None:
    sizes = dict(image_size=32, patch_size=8, hidden_size=32, layers=2, heads=2) if args.scale == "tiny" else \
        dict(image_size=384, patch_size=16, hidden_size=768, layers=12, heads=12)  # BLIP-base towers
    build_tiny_blip(folder / "blip", **sizes)
    dtype = "float16" if args.precision in ("fp16", "amp") and args.device.startswith("cuda") else "float32"
    captioner = load_captioner(str(folder / "blip"), prompt="a picture of", max_new_tokens=args.max_new_tokens,
                               device=args.device, dtype=dtype)
    images = random_images(args.n_captions, args.image_px)
    captioner.caption(images[: args.caption_batch], batch_size=args.caption_batch)  # warm-up
    seconds, captions = timed(lambda: captioner.caption(images, batch_size=args.caption_batch), args.device)
    one_s, _ = timed(lambda: [captioner.caption([im], batch_size=1) for im in images[:4]], args.device)
    print(f"BLIP captioning ({args.scale}, {args.device}, {dtype}, max {args.max_new_tokens} new tokens)")
    print(f"  batched (batch {args.caption_batch:3d}):            {len(images) / seconds:8.1f} images/s "
          f"({len(images)} images)")
    print(f"  one image per call:             {4 / one_s:8.1f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", help="fp32 | amp | fp16 | bf16 (HPS); fp16/amp -> fp16 BLIP")
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--baseline-images", type=int, default=32, help="images scored by the slow path")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-captions", type=int, default=64)
    parser.add_argument("--caption-batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--image-px", type=int, default=256, help="long side of the random input images")
    parser.add_argument("--skip", choices=["hps", "caption"], action="append", default=[])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        if "hps" not in args.skip:
            bench_hps(args, Path(tmp))
        if "caption" not in args.skip:
            bench_captioning(args, Path(tmp))


if __name__ == "__main__":
    main()
