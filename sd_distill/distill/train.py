"""Command line for one distillation phase; runs as-is or under ``accelerate launch``.

    python -m sd_distill.distill.train --params params.json --phase 0 --cache runs/cache --out runs/phase-00 [--resume]
    accelerate launch --multi_gpu --num_processes 2 -m sd_distill.distill.train --params params.json --phase 1 \\
        --cache runs/cache --out runs/phase-01 --previous runs/phase-00 --resume

stdout carries JSON lines for the Prefect task: ``{"event": "progress", ...}`` per logged step, then
``{"event": "done", ...summary}``; a diverged run prints ``{"event": "error", ...}`` and exits with status 3,
bad input exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sd_distill.distill.config import DistillParams
from sd_distill.distill.hooks.nan_guard import TrainingDivergedError
from sd_distill.distill.methods import plan_phases
from sd_distill.distill.trainer import train_phase


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sd_distill.distill.train", description=__doc__.splitlines()[0])
    p.add_argument("--params", required=True, type=Path, help="DistillParams as JSON")
    p.add_argument("--phase", required=True, type=int, help="index into plan_phases(params.method)")
    p.add_argument("--cache", required=True, type=Path, help="latent cache folder (build_latent_cache)")
    p.add_argument("--out", required=True, type=Path, help="this phase's output folder")
    p.add_argument("--previous", type=Path, help="previous phase folder: its student is this phase's teacher and init")
    p.add_argument("--teacher-unet", type=Path, help="teacher UNet folder (overrides --previous for the teacher)")
    p.add_argument("--student-init", type=Path, help="initial student UNet folder (overrides --previous for the init)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def emit(event: dict) -> None:
        # one JSON stream: under `accelerate launch` every process would print its own line, and two
        # processes writing at once interleave on the launcher's stdout; the other ranks use stderr
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(event), flush=True)

    try:
        params = DistillParams.model_validate_json(args.params.read_text())
        phases = plan_phases(params.method)
        if not 0 <= args.phase < len(phases):
            raise ValueError(f"--phase {args.phase} out of range: method {params.method.kind!r} has "
                             f"{len(phases)} phase(s) {[p.name for p in phases]}")
        summary = train_phase(
            params, phases[args.phase], args.cache, args.out,
            teacher_unet_ref=args.teacher_unet or args.previous, student_init_ref=args.student_init or args.previous,
            resume=args.resume,
        )
    except TrainingDivergedError as exc:
        emit({"event": "error", "error": str(exc), "last_checkpoint": str(exc.last_checkpoint or "")})
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError, NotImplementedError, OSError) as exc:
        emit({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    emit({"event": "done", **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
