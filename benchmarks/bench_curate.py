"""Images per second through the curate stage's steps, on this machine, with the toy world.

    .venv/bin/python benchmarks/bench_curate.py                 # 200 toy images, toy/tiny models, CPU
    .venv/bin/python benchmarks/bench_curate.py --n 1000 --device cuda
    .venv/bin/python benchmarks/bench_curate.py --partitions 2 --n 200   # the curate flow, P=1 vs P=2 on Dask

What is timed (wall clock, each step as the pipeline runs it, Parquet I/O included):

- download: ``download_images`` (img2dataset in a child process against the loopback server). It is
  run twice, on a small and on the full set, so the fixed start-up cost (img2dataset spawns a pool and
  a logger process, each importing torch) and the per-image rate can be told apart;
- scoring: ``score_and_filter`` with the HPS scorer loaded once (model load timed separately);
- captioning: ``recaption`` (generation + cleaning + similarity choice) with the captioner loaded once;
- HPS batched vs per call: the same (image, caption) pairs scored by ``HPSScorer.score`` and by
  ``sd_distill.scoring.hps_per_call.PerCallHPS`` (hpsv2.score's path: checkpoint reloaded every call,
  one image per forward) on the same tiny checkpoint, scores checked equal.

With ``--partitions P`` only this is measured instead: the wall time of the whole ``curate`` flow (collect,
download, score, filter, recaption, shards; a temporary local Prefect server, started before the clock)
with ``partitions=1`` and with ``partitions=P`` on a Dask LocalCluster (``--runner``), each into a fresh
store, and whether both give the same kept keys and captions.

Models: ``toy:hps`` / ``toy:blip`` when shipped, else tiny random models in the same architectures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sd_distill.curate import CaptionParams, CurateParams, DownloadParams, FilterParams, SourceSpec  # noqa: E402
from sd_distill.curate import collect_sources, download_images, recaption, score_and_filter  # noqa: E402
from sd_distill.curate.filter import decode_images  # noqa: E402
from sd_distill.modelref import TOY_ASSETS  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def model_refs(tmp: Path) -> tuple[str, str, str]:
    """(hps ref, captioner ref, what they are): shipped toy models if present, else tiny random ones."""
    if (TOY_ASSETS / "hps").exists() and (TOY_ASSETS / "blip").exists():
        return "toy:hps", "toy:blip", "toy:hps + toy:blip (shipped, trained)"
    from sd_distill.tiny.blip import build_tiny_blip
    from sd_distill.tiny.clip import build_tiny_open_clip

    return (
        str(build_tiny_open_clip(tmp / "hps", name="bench-curate-hps")),
        str(build_tiny_blip(tmp / "blip")),
        "tiny random open_clip ViT + BLIP (toy models not shipped yet)",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="toy samples (images) to push through")
    ap.add_argument("--small", type=int, default=10, help="size of the start-up-cost download run")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=16, help="img2dataset download threads")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--per-call-pairs", type=int, default=40, help="pairs for the batched vs per-call HPS comparison")
    ap.add_argument("--partitions", type=int, default=1, help="P > 1: time the curate flow with 1 vs P partitions (only)")
    ap.add_argument("--runner", choices=["dask", "thread"], default="dask", help="task runner of the partitioned run")
    ap.add_argument("--workers", type=int, default=None, help="Dask workers (default: one per partition)")
    args = ap.parse_args()
    if args.partitions > 1:
        return partitions_main(args)

    with tempfile.TemporaryDirectory(prefix="bench-curate-") as tmp:
        tmp = Path(tmp)
        hps_ref, blip_ref, models = model_refs(tmp)
        print(f"models: {models}; device {args.device}; {os.cpu_count()} CPUs visible")
        rows = []
        results = {}
        for n in (args.small, args.n):
            params = CurateParams(
                sources=[SourceSpec(kind="toy", toy_n=n, toy_seed=1)],
                download=DownloadParams(image_size=args.image_size, threads=args.threads),
                filter=FilterParams(hps_model=hps_ref, batch_size=args.batch_size, device=args.device),
                caption=CaptionParams(captioner=blip_ref, batch_size=args.batch_size, device=args.device),
            )
            run = tmp / f"n{n}"
            collect_sources(params, run / "collect")
            t, counts = timed(lambda: download_images(params, run / "collect", run / "download"))
            results[n] = (t, counts["downloaded"], params, run)
            rows.append((f"download ({n} images, start-up included)", n, t))
        (t_small, _, _, _), (t_big, n_ok, params, run) = results[args.small], results[args.n]
        marginal = (args.n - args.small) / max(t_big - t_small, 1e-9)

        from sd_distill.captioning.blip import load_captioner
        from sd_distill.scoring.hps import load_hps_scorer

        t_load_s, scorer = timed(lambda: load_hps_scorer(hps_ref, version="v2.1", device=args.device))
        t_score, _ = timed(lambda: score_and_filter(params, run / "download", run / "filter", scorer=scorer))
        rows.append(("HPS score + filter", n_ok, t_score))
        t_load_c, captioner = timed(lambda: load_captioner(blip_ref, max_new_tokens=params.caption.max_new_tokens, device=args.device))
        t_cap, rc = timed(lambda: recaption(params, run / "filter", run / "recaption", captioner=captioner, scorer=scorer))
        rows.append(("recaption (generate + clean + choose)", rc["in"], t_cap))

        print(f"\n{'step':44s} {'images':>7s} {'seconds':>8s} {'images/s':>9s}")
        for name, n, t in rows:
            print(f"{name:44s} {n:7d} {t:8.2f} {n / t:9.1f}")
        print(f"{'download, per image (start-up removed)':44s} {args.n - args.small:7d} {t_big - t_small:8.2f} {marginal:9.1f}")
        print(f"download start-up cost ~ {t_small - args.small / marginal:.1f} s; model load: HPS {t_load_s:.2f} s, captioner {t_load_c:.2f} s")

        # batched scorer vs hpsv2's per-call path, same tiny checkpoint, same pairs
        from sd_distill.scoring.hps_per_call import PerCallHPS
        from sd_distill.tiny.clip import build_tiny_open_clip
        import pandas as pd

        ckpt_dir = build_tiny_open_clip(tmp / "percall", name="bench-curate-percall")
        df = pd.read_parquet(run / "download" / "downloaded.parquet").head(args.per_call_pairs)
        images, prompts = decode_images(df["image"]), df["caption_original"].tolist()
        batched = load_hps_scorer(str(ckpt_dir / "HPS_v2.1_compressed.pt"), version="v2.1", arch="bench-curate-percall", device=args.device)
        per_call = PerCallHPS(ckpt_dir / "HPS_v2.1_compressed.pt", arch="bench-curate-percall", device=args.device)
        t_b, s_b = timed(lambda: batched.score(images, prompts, batch_size=args.batch_size))
        t_p, s_p = timed(lambda: np.concatenate([per_call.score([im], p) for im, p in zip(images, prompts)]))
        same = np.allclose(s_b, s_p, atol=1e-5)
        print(f"\nHPS on {len(images)} pairs (tiny checkpoint): batched {len(images) / t_b:.1f} pairs/s, "
              f"hpsv2 per-call path {len(images) / t_p:.1f} pairs/s -> speed-up x{t_p / t_b:.1f} (scores equal: {same})")


def partitions_main(args) -> None:
    """The curate flow with 1 and with ``args.partitions`` partitions; prints wall times and whether they agree."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    from flows.curate import curate
    from sd_distill.curate import DaskParams, read_curated

    with tempfile.TemporaryDirectory(prefix="bench-curate-parts-") as tmp, prefect_test_harness(server_startup_timeout=120):
        tmp = Path(tmp)
        hps_ref, blip_ref, models = model_refs(tmp)
        print(f"models: {models}; device {args.device}; {os.cpu_count()} CPUs visible; {args.n} toy samples")
        base = dict(
            sources=[SourceSpec(kind="toy", toy_n=args.n, toy_seed=1)],
            download=DownloadParams(image_size=args.image_size, threads=args.threads),
            filter=FilterParams(hps_model=hps_ref, batch_size=args.batch_size, device=args.device),
            caption=CaptionParams(captioner=blip_ref, batch_size=args.batch_size, device=args.device),
        )
        p = args.partitions
        runs = {}
        for label, params in [
            ("partitions=1", CurateParams(**base)),
            (f"partitions={p} ({args.runner})", CurateParams(**base, partitions=p, task_runner=args.runner,
                                                            dask=DaskParams(n_workers=args.workers))),
        ]:
            t, manifest = timed(lambda: curate(params, str(tmp / f"store-{len(runs)}")))
            runs[label] = (t, read_curated(manifest.path, columns=["key", "caption"]))
        print(f"\n{'curate flow':32s} {'seconds':>8s} {'kept':>5s}")
        for label, (t, df) in runs.items():
            print(f"{label:32s} {t:8.2f} {len(df):5d}")
        (t1, a), (tp, b) = runs.values()
        same = a["key"].tolist() == b["key"].tolist() and a["caption"].tolist() == b["caption"].tolist()
        print(f"speed-up x{t1 / tp:.2f}; same kept keys and captions: {same}")


if __name__ == "__main__":
    main()
