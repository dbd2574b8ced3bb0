"""Checkpoints every N optimizer steps with everything an exact resume needs.

A checkpoint folder ``checkpoints/step-0000100/`` holds:

- ``student.safetensors``   the trainable student's state dict (fp32)
- ``optimizer.pt``, ``lr_scheduler.pt``, ``grad_scaler.pt`` (fp16 only), ``ema.pt`` (EMA on only)
- ``rng-<rank>.pt``         torch CPU/CUDA, numpy, python ``random`` and the loss generator's states, per process
- ``trainer_state.json``    step, data position, NaN-guard state, loss history, the run's parameters

It is written into ``step-XXXXXXX.tmp`` and renamed when complete (``trainer_state.json`` is written
last), so a crash while saving never leaves a folder that looks finished; only the newest ``keep``
checkpoints are kept. Everything is loaded with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE = "trainer_state.json"


def _noop() -> None:
    return None


def checkpoint_folder(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (one with trainer_state.json), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def rng_states(generator: torch.Generator) -> dict:
    """Every random state the loop touches, as tensors and plain Python values."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "generator": generator.get_state(),
    }


def restore_rng_states(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    generator.set_state(state["generator"])


def save_checkpoint(
    root: Path,
    step: int,
    *,
    student: torch.nn.Module,
    optimizer,
    lr_scheduler,
    generator: torch.Generator,
    trainer_state: dict,
    ema=None,
    grad_scaler=None,
    rank: int = 0,
    is_main: bool = True,
    keep: int = 2,
    barrier: Callable[[], None] = _noop,
) -> Path:
    """Write checkpoint ``step`` under ``root``; every process calls it (each saves its own RNG states)."""
    final = checkpoint_folder(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in student.state_dict().items()}
        save_file(state, str(tmp / "student.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if grad_scaler is not None:
            torch.save(grad_scaler.state_dict(), tmp / "grad_scaler.pt")
        if ema is not None:
            torch.save(ema.state_dict(), tmp / "ema.pt")
    barrier()
    torch.save(rng_states(generator), tmp / f"rng-{rank}.pt")
    barrier()
    if is_main:
        (tmp / STATE).write_text(json.dumps(dict(trainer_state, step=step), indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        older = sorted((p for p in Path(root).glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")),
                       key=lambda p: int(p.name.split("-")[1]))
        for old in older[: max(0, len(older) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    folder: Path,
    *,
    student: torch.nn.Module,
    optimizer,
    lr_scheduler,
    generator: torch.Generator,
    ema=None,
    grad_scaler=None,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer state (step, data position, ...)."""
    folder = Path(folder)
    if not (folder / STATE).exists():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {STATE})")
    weights = load_file(str(folder / "student.safetensors"))
    own = student.state_dict()
    with torch.no_grad():
        for name, value in own.items():
            value.copy_(weights[name].to(value.dtype))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(folder / "lr_scheduler.pt", weights_only=True))
    if grad_scaler is not None and (folder / "grad_scaler.pt").exists():
        grad_scaler.load_state_dict(torch.load(folder / "grad_scaler.pt", weights_only=True))
    if ema is not None:
        if not (folder / "ema.pt").exists():
            raise FileNotFoundError(f"{folder} was written with EMA off; resume with trainer.ema_decay=None")
        ema.load_state_dict(torch.load(folder / "ema.pt", weights_only=True))
    rng_file = folder / f"rng-{rank}.pt"
    if not rng_file.exists():
        raise FileNotFoundError(f"{rng_file} missing: the checkpoint was written by fewer processes than are resuming")
    restore_rng_states(torch.load(rng_file, weights_only=True), generator)
    return json.loads((folder / STATE).read_text())
