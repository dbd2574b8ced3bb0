"""The training loop of one distillation phase (``train_phase``), read top to bottom.

Phases of the loop (nanoGPT-style):
  0. setup      accelerate ``Accelerator`` (1 GPU, several under ``accelerate launch``, or CPU), seeds
  1. models     teacher (frozen, in the autocast dtype), phase teacher UNet, student (fp32 weights),
                gradient checkpointing, SDPA attention (diffusers' ``AttnProcessor2_0``), channels_last and
                torch.compile when asked (``speed.py``), the method
  2. optimizer  AdamW (fused on CUDA) + ``LambdaLR`` over ``lr_multiplier`` (warm-up, then constant / cosine / linear)
  3. resume     newest complete checkpoint: weights, optimizer, LR schedule, EMA, RNG states, data position
  4. loop       per optimizer step: grad_accum micro-batches of forward (autocast) / backward, loss
                averaged over processes, clip, NaN guard, optimizer step, EMA, LR step, log, checkpoint;
                with ``nan_check_every`` > 1 the guard's verdict stays on the device and the host reads losses
                and the guard every N steps (and at log / checkpoint steps), so no step waits on a host read
  5. output     ``unet/`` (EMA weights when EMA is on), ``loss_curve.csv``, ``phase.json``
Side concerns are hooks in ``hooks/`` (ema, nan_guard, checkpoint, progress).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from sd_distill.distill import methods  # methods.build_method is looked up per phase, so a fault can be injected into it
from sd_distill.distill.config import DistillParams, TrainerConfig
from sd_distill.distill.data import LatentDataset, encode_pixels, micro_batch_indices
from sd_distill.distill.hooks.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sd_distill.distill.hooks.ema import EMA
from sd_distill.distill.hooks.nan_guard import DeviceNanGuard, NanGuard, skip_update
from sd_distill.distill.hooks.progress import ProgressHook
from sd_distill.distill.speed import compile_unet, make_adamw, skip_step_on_device, to_channels_last
from sd_distill.distill.teacher import load_teacher
from sd_distill.progress import ProgressFn

AUTOCAST_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def lr_multiplier(step: int, cfg: TrainerConfig) -> float:
    """Learning-rate factor for optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def load_unet(ref: str | Path, device="cpu", dtype=torch.float32):
    """A UNet2DConditionModel from a phase folder / pipeline folder (``unet/`` inside) or a UNet folder."""
    from diffusers import UNet2DConditionModel  # deferred: heavy (diffusers)

    folder = Path(ref)
    if (folder / "unet" / "config.json").exists():
        folder = folder / "unet"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no UNet in {ref}: expected {Path(ref) / 'unet' / 'config.json'} or {folder / 'config.json'}")
    return UNet2DConditionModel.from_pretrained(str(folder)).to(device, dtype)


def use_sdpa(unet) -> None:
    """PyTorch scaled-dot-product attention in every attention layer (diffusers' AttnProcessor2_0)."""
    from diffusers.models.attention_processor import AttnProcessor2_0  # deferred: heavy (diffusers)

    if hasattr(unet, "set_attn_processor"):
        unet.set_attn_processor(AttnProcessor2_0())


def make_accelerator(cfg: TrainerConfig):
    from accelerate import Accelerator  # deferred: heavy (accelerate)

    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if cfg.mixed_precision == "fp16" and cpu:
        raise ValueError("trainer.mixed_precision='fp16' needs a GPU; on the CPU use 'bf16' or 'no'")
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu)


def phase_trainer(tc, phase):
    """The trainer settings of ``phase``: ``tc`` with the phase's own ``max_steps`` / ``lr`` / ``batch_size`` where it
    sets them."""
    update = {k: getattr(phase, k) for k in ("max_steps", "lr", "batch_size") if getattr(phase, k, None) is not None}
    return tc.model_copy(update=update) if update else tc


def train_phase(
    params: DistillParams,
    phase,
    cache_dir: str | Path,
    out_dir: str | Path,
    teacher_unet_ref: Optional[str | Path] = None,
    student_init_ref: Optional[str | Path] = None,
    progress: Optional[ProgressFn] = None,
    resume: bool = True,
) -> dict:
    """Train one phase's student; writes ``unet/``, ``loss_curve.csv``, ``phase.json``, ``checkpoints/``.

    ``teacher_unet_ref`` / ``student_init_ref``: folders of earlier phases (progressive chains); None means
    the original teacher's UNet and ``make_student(...)`` from it (so does a ``phase.new_student``: the first
    distillation phase after a fine-tune makes its student from the fine-tuned teacher). ``phase.max_steps`` /
    ``phase.lr`` / ``phase.batch_size`` override the trainer's for this phase. ``resume``: continue from the
    newest complete checkpoint in ``out_dir/checkpoints`` when there is one.
    """
    from accelerate.utils import set_seed  # deferred: heavy (accelerate)

    tc = phase_trainer(params.trainer, phase)
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"

    # 0. setup --------------------------------------------------------------------------------------
    accelerator = make_accelerator(tc)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if world != tc.num_processes:
        raise ValueError(f"trainer.num_processes is {tc.num_processes} but {world} process(es) are running: launch with "
                         f"`accelerate launch --multi_gpu --num_processes {tc.num_processes} -m sd_distill.distill.train ...` "
                         "(without --multi_gpu, accelerate runs one process on a machine without GPUs)")
    set_seed(tc.seed + rank)
    frozen_dtype = AUTOCAST_DTYPES[tc.mixed_precision]
    dataset = LatentDataset(cache_dir)  # fails early on a missing or empty cache
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    # 1. models: frozen teachers in the autocast dtype, the student in fp32 ----------------------------
    teacher = load_teacher(params.teacher, device="cpu", dtype=torch.float32)
    teacher_unet = load_unet(teacher_unet_ref) if teacher_unet_ref else teacher.unet
    if phase.new_student:  # made from this phase's teacher below, not loaded from the previous phase
        student_init_ref = None
    if student_init_ref:
        student = load_unet(student_init_ref)
    else:
        student = methods.make_student(params.method, teacher_unet, phase)
    student = student.to(device, torch.float32).train()
    student.requires_grad_(True)
    teacher_unet.requires_grad_(False).eval().to(device, frozen_dtype)  # the original UNet stays on the CPU if unused
    for unet in (student, teacher_unet):
        use_sdpa(unet)
    if tc.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    for unet in (student, teacher_unet):
        if tc.channels_last:
            to_channels_last(unet)
        compile_unet(unet, tc.compile_unets, tc.compile_mode, tc.compile_backend)
    if not dataset.cache_latents:
        teacher.vae.requires_grad_(False).eval().to(device, frozen_dtype)
    method = methods.build_method(params.method, phase, teacher, teacher_unet, student)

    # 2. optimizer and learning-rate schedule ---------------------------------------------------------
    trainable = [p for p in student.parameters() if p.requires_grad]
    lazy = tc.nan_check_every > 1  # the NaN guard decides on the device, read every nan_check_every steps
    optimizer = make_adamw(trainable, tc, device, lazy_guard=lazy)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, tc))
    student, optimizer = accelerator.prepare(student, optimizer)  # DDP wrap when several processes
    method.student = student
    raw_student = accelerator.unwrap_model(student)
    if student is not raw_student:  # methods read unet.config (e.g. time_cond_proj_dim) through the DDP wrapper
        student.config = raw_student.config
    ema = EMA(raw_student, tc.ema_decay) if tc.ema_decay else None
    guard = NanGuard(patience=tc.nan_patience, explode_factor=tc.loss_explode_factor)
    generator = torch.Generator(device=device).manual_seed(tc.seed * 7919 + rank)

    # 3. resume ---------------------------------------------------------------------------------------
    step, data_position, history, resumed_from = 0, 0, [], None
    last_ckpt = latest_checkpoint(ckpt_root) if resume else None
    if not resume and accelerator.is_main_process and ckpt_root.exists():
        shutil.rmtree(ckpt_root)  # starting over: older checkpoints must not outrank the new ones
    accelerator.wait_for_everyone()
    if last_ckpt is not None:
        check_resumable(last_ckpt, params, phase, world)
        state = load_checkpoint(last_ckpt, student=raw_student, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                generator=generator, ema=ema, grad_scaler=accelerator.scaler, rank=rank)
        step, data_position, history = state["step"], state["data_position"], state["history"]
        guard.load_state_dict(state["nan_guard"])
        resumed_from = str(last_ckpt)
    device_guard = DeviceNanGuard(guard, device) if lazy else None
    pending: list[tuple] = []  # lazy: (step, loss, lr, grad_norm, skipped, logs) still on the device

    def checkpoint() -> Path:
        trainer_state = {"data_position": data_position, "history": history, "nan_guard": guard.state_dict(),
                         "phase": _dump(phase), "params": params.model_dump(mode="json"), "world_size": world}
        return save_checkpoint(ckpt_root, step, student=raw_student, optimizer=optimizer, lr_scheduler=lr_scheduler,
                               generator=generator, trainer_state=trainer_state, ema=ema, grad_scaler=accelerator.scaler,
                               rank=rank, is_main=accelerator.is_main_process, keep=tc.keep_checkpoints,
                               barrier=accelerator.wait_for_everyone)

    # 4. the loop -------------------------------------------------------------------------------------
    hook = ProgressHook(tc.max_steps, tc.batch_size * tc.grad_accum * world, progress, tc.log_every,
                        enabled=accelerator.is_main_process)
    t_start, steps_run = time.perf_counter(), 0
    try:
        while step < tc.max_steps:
            # forward / backward over grad_accum micro-batches (gradients synchronised on the last one)
            loss_sum = torch.zeros((), device=device)
            logs_sum: dict[str, float] = {}
            for micro in range(tc.grad_accum):
                idx = micro_batch_indices(len(dataset), tc.batch_size, data_position, tc.seed, rank, world)
                data_position += 1
                batch = dataset.batch(idx, generator, params.data.sample_posterior, device)
                if "pixels" in batch:  # cache without latents: encode this batch now
                    mean, std = encode_pixels(teacher.vae, batch.pop("pixels"))
                    batch["latents"] = mean + std * torch.randn(mean.shape, generator=generator, device=device) \
                        if params.data.sample_posterior else mean
                sync = micro == tc.grad_accum - 1
                with (contextlib.nullcontext() if sync else accelerator.no_sync(student)), accelerator.autocast():
                    loss, logs = method.loss(batch, generator)
                accelerator.backward(loss / tc.grad_accum)
                loss_sum += loss.detach().float() / tc.grad_accum
                for k, v in logs.items():  # tensors stay on the device (summed there), floats are summed here
                    v = v.detach() if isinstance(v, torch.Tensor) else float(v)
                    logs_sum[k] = logs_sum.get(k, 0.0) + v / tc.grad_accum
            loss_mean = accelerator.reduce(loss_sum, reduction="mean")

            # clip, guard, step
            grad_norm = accelerator.clip_grad_norm_(trainable, tc.max_grad_norm or float("inf"))
            lr = lr_scheduler.get_last_lr()[0]
            if lazy:  # verdict on the device: the fused AdamW and the EMA skip a bad step without a host read
                skip = device_guard.step(step + 1, loss_mean, grad_norm)
                skip_step_on_device(optimizer, skip)
                optimizer.step()
                if ema is not None:
                    ema.update(raw_student, skip=skip)
                pending.append((step + 1, loss_mean, lr, grad_norm, skip, logs_sum))
            else:
                loss_value = loss_mean.item()
                grad_norm = float(grad_norm) if grad_norm is not None else None
                good = guard.check(step + 1, loss_value, None if tc.mixed_precision == "fp16" else grad_norm, last_ckpt)
                if good:
                    optimizer.step()
                    if ema is not None and not getattr(optimizer, "step_was_skipped", False):
                        ema.update(raw_student)
                else:
                    skip_update(accelerator.scaler)
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            step += 1
            steps_run += 1

            # log and checkpoint (lazy: first read the guard and the pending steps' numbers, one sync)
            at_checkpoint = step % tc.checkpoint_every == 0 or step == tc.max_steps
            if lazy and (at_checkpoint or step % tc.nan_check_every == 0 or step % tc.log_every == 0):
                device_guard.read(last_ckpt)  # raises for a diverged step, as the eager guard would have
                records, pending = read_pending(pending), []
            elif lazy:
                records = []
            else:
                records = [{"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "skipped": not good,
                            **{k: float(v) for k, v in logs_sum.items()}}]
            for record in records:
                history.append(record)
                hook.on_step(record["step"], record["loss"], lr=record["lr"], phase=getattr(phase, "index", 0))
            good = bool(records) and not records[-1]["skipped"]
            if good and at_checkpoint:
                last_ckpt = checkpoint()
    finally:
        getattr(method, "close", lambda: None)()  # e.g. BK-SDM's feature hooks
    elapsed = time.perf_counter() - t_start

    # 5. output: the phase's student (EMA weights when on), loss curve, summary ----------------------
    accelerator.wait_for_everyone()
    if last_ckpt is None or not str(last_ckpt).endswith(f"{step:07d}"):
        last_ckpt = checkpoint()
    if ema is not None:
        ema.sync()
    summary = {
        "phase": _dump(phase),
        "steps": step,
        "steps_this_run": steps_run,
        "resumed_from": resumed_from,
        "final_loss": history[-1]["loss"] if history else None,
        "samples_per_s": round(steps_run * tc.batch_size * tc.grad_accum * world / max(elapsed, 1e-9), 3),
        "skipped_steps": sum(1 for h in history if h["skipped"]),
        "checkpoint": str(last_ckpt),
        "unet": str(out_dir / "unet"),
        "teacher_unet": str(teacher_unet_ref) if teacher_unet_ref else None,  # None: the teacher pipeline's UNet
        "student_init": str(student_init_ref) if student_init_ref else None,  # None: made from this phase's teacher
        "ema": ema is not None,
        "prediction_type": getattr(teacher, "prediction_type", None),
        "time_cond_proj_dim": raw_student.config.get("time_cond_proj_dim"),
        "timestep_spacing": getattr(getattr(method, "schedule", None), "timestep_spacing", None),
        "world_size": world,
    }
    if accelerator.is_main_process:
        export_unet = raw_student
        if ema is not None:
            export_unet = copy.deepcopy(raw_student)
            ema.copy_to(export_unet)
        if tc.gradient_checkpointing and hasattr(export_unet, "disable_gradient_checkpointing"):
            export_unet.disable_gradient_checkpointing()
        export_unet.save_pretrained(str(out_dir / "unet"), safe_serialization=True)
        write_loss_curve(history, out_dir / "loss_curve.csv")
        (out_dir / "phase.json").write_text(json.dumps(summary, indent=1))
    accelerator.wait_for_everyone()
    return summary


# parameters that may change between an interrupted run and its resumption without changing the result
RESUME_MAY_CHANGE = {"max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "nan_check_every"}


def read_pending(pending: list[tuple]) -> list[dict]:
    """History records of the steps whose numbers are still on the device: one read for all of them.

    ``pending``: (step, loss, lr, grad_norm, skip, logs) per step, with device scalars for loss, grad_norm (or None),
    skip and the logs' values (floats are taken as they are). The values are those the eager path records
    (float32 losses and norms, the logs summed in float32)."""
    if not pending:
        return []
    device = pending[0][1].device
    rows = []
    for _, loss, _, grad_norm, skip, logs in pending:
        norm = grad_norm if grad_norm is not None else torch.tensor(float("nan"), device=device)
        rows += [loss, norm, skip] + [torch.as_tensor(v, device=device) for v in logs.values()]
    values = iter(torch.stack([v.detach().float().reshape(()) for v in rows]).cpu().tolist())
    records = []
    for step, _, lr, grad_norm, _, logs in pending:
        loss, norm, skipped = next(values), next(values), next(values)
        records.append({"step": step, "loss": loss, "lr": lr, "grad_norm": None if grad_norm is None else norm,
                        "skipped": bool(skipped), **{k: next(values) for k in logs}})
    return records


def check_resumable(folder: Path, params: DistillParams, phase, world: int) -> None:
    """Refuse to resume a checkpoint written for other parameters, another phase or another process count."""
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    now, then = _flat(params.model_dump(mode="json")), _flat(state["params"])
    diff = sorted(k for k in now.keys() | then.keys()
                  if now.get(k) != then.get(k) and not (k.startswith("trainer.") and k[8:] in RESUME_MAY_CHANGE))
    if diff or state["phase"] != _dump(phase) or state["world_size"] != world:
        raise ValueError(
            f"cannot resume from {folder}: it was written with different "
            f"{'parameters ' + ', '.join(diff) if diff else 'phase or process count'} "
            f"(phase {state['phase'].get('name')}, {state['world_size']} process(es)); use a fresh out_dir or resume=False"
        )


def _flat(d: dict, prefix: str = "") -> dict:
    """{"trainer": {"lr": 1}} -> {"trainer.lr": 1}"""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _dump(phase) -> dict:
    return phase.model_dump(mode="json") if hasattr(phase, "model_dump") else dict(vars(phase))


def write_loss_curve(history: list[dict], path: Path) -> Path:
    """One CSV row per optimizer step (step, loss, lr, grad_norm, skipped, the method's loss terms)."""
    keys: list[str] = []
    for h in history:
        keys += [k for k in h if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys or ["step", "loss"])
        w.writeheader()
        w.writerows(history)
    return path
