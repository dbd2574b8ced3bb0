"""Retrain the shipped toy models from scratch: ``python scripts/train_toy_models.py [--only NAME] [--out DIR]``.

``--check`` retrains into ``--out`` (a temporary folder by default) and compares every weight file with the
shipped one: it prints the largest difference per file and exits 1 above ``--tolerance``.

Models (folder names under ``sd_distill/toy/assets/`` by default):
  sd, sd-v    diffusers StableDiffusionPipeline folders (epsilon teacher; v-prediction fine-tune of it)
  sd-lpb2     the sd recipe with two (resnet, attention) pairs per UNet down stage, as SD (BK-SDM removal needs it)
  classifier  the toy attribute classifier / feature extractor (config.json + model.safetensors)
  hps         an open_clip model folder (open_clip_config.json + open_clip_model.safetensors)
  blip        a transformers BlipForConditionalGeneration + BlipProcessor folder
Each trainer is deterministic on CPU; its summary (config, losses, held-out accuracy, timings) is written
into the model's folder as ``train_summary.json`` (``sd/train_summary.json`` covers sd and sd-v).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd_distill.modelref import TOY_ASSETS  # noqa: E402

MODELS = ("sd", "sd-lpb2", "classifier", "hps", "blip")


def log_progress(name: str):
    """A ProgressFn printing one line per report (phases restart their counts, so no single bar fits)."""

    def update(done: int, total: int, message: str = "") -> None:
        print(f"[{name}] {done}/{total} {message}", flush=True)

    return update


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def train(name: str, out: Path, device: str = "cpu") -> dict:
    """Train one model family into ``out``; returns its summary."""
    if name == "sd":
        from sd_distill.toy.train_sd import ToySDConfig, train_toy_sd

        return train_toy_sd(_fresh(out / "sd"), ToySDConfig(device=device), v_out_dir=_fresh(out / "sd-v"), progress=log_progress("toy:sd"))
    if name == "sd-lpb2":
        from sd_distill.toy.train_sd import ToySDLpb2Config, train_toy_sd

        return train_toy_sd(_fresh(out / "sd-lpb2"), ToySDLpb2Config(device=device), progress=log_progress("toy:sd-lpb2"))
    if name == "classifier":
        from sd_distill.toy.train_classifier import train_toy_classifier

        return train_toy_classifier(_fresh(out / "classifier"), progress=log_progress("toy:classifier"))
    if name == "hps":
        from sd_distill.toy.train_hps import train_toy_hps

        return train_toy_hps(_fresh(out / "hps"), progress=log_progress("toy:hps"))
    if name == "blip":
        from sd_distill.toy.train_blip import train_toy_blip

        return train_toy_blip(_fresh(out / "blip"), progress=log_progress("toy:blip"))
    raise ValueError(f"unknown toy model {name!r}; valid: {MODELS}")


def weight_differences(fresh: Path, shipped: Path) -> dict[str, float]:
    """Largest absolute difference per ``*.safetensors`` file (relative path -> value; inf when a file or tensor
    is missing on one side or the shapes differ)."""
    from safetensors.torch import load_file

    out: dict[str, float] = {}
    names = sorted({p.relative_to(fresh).as_posix() for p in fresh.rglob("*.safetensors")}
                   | {p.relative_to(shipped).as_posix() for p in shipped.rglob("*.safetensors")})
    for name in names:
        if not (fresh / name).is_file() or not (shipped / name).is_file():
            out[name] = float("inf")
            continue
        a, b = load_file(str(fresh / name)), load_file(str(shipped / name))
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            out[name] = float("inf")
            continue
        out[name] = max((float((a[k].float() - b[k].float()).abs().max()) for k in a), default=0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=MODELS, action="append", help="train only this model (repeatable)")
    parser.add_argument("--out", type=Path, default=TOY_ASSETS, help=f"output folder (default {TOY_ASSETS})")
    parser.add_argument("--device", default="cpu", help="torch device for the SD trainer (the others always run on CPU)")
    parser.add_argument("--check", action="store_true",
                        help="retrain into --out (default: a temporary folder) and compare with the shipped weights")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest weight difference --check accepts")
    args = parser.parse_args(argv)
    if args.check:
        return check(args)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or MODELS:
        t0 = time.perf_counter()
        summary = train(name, args.out, args.device)
        summary["wall_s"] = round(time.perf_counter() - t0, 1)
        (args.out / name / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        print(f"{name}: {summary['wall_s']} s -> {args.out / name}: {json.dumps(summary, default=str)}", flush=True)
    return 0


def check(args) -> int:
    """Retrain, then compare every weight file with the shipped model's."""
    import tempfile

    out = args.out if args.out != TOY_ASSETS else Path(tempfile.mkdtemp(prefix="toy-retrain-"))
    names = args.only or MODELS
    main([*sum((["--only", n] for n in names), []), "--out", str(out), "--device", args.device])
    worst = 0.0
    for name in names:
        for folder in [name] + (["sd-v"] if name == "sd" else []):
            for file, diff in weight_differences(out / folder, TOY_ASSETS / folder).items():
                print(f"{folder}/{file}: largest difference {diff:.3g}")
                worst = max(worst, diff)
    ok = worst <= args.tolerance
    print(f"{'match' if ok else 'MISMATCH'}: largest weight difference {worst:.3g} (tolerance {args.tolerance:g}); retrained in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
