"""Parameters of the distill stage: one pydantic model, used as the Prefect flow parameter.

Defaults are sized for the shipped toy teacher (``toy:sd``: a CPU run of a minute or two). For a real
SD 1.5 teacher a typical override is ``trainer: {max_steps: 10000, batch_size: 8, lr: 1e-5,
mixed_precision: "bf16", gradient_checkpointing: true, ema_decay: 0.9999, checkpoint_every: 500}``; on a GPU the
speed fields add e.g. ``channels_last: true, compile_unets: "regional", nan_check_every: 10``
(``benchmarks/device_gpu_speed.py`` measures them).
"""

from __future__ import annotations

import re

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sd_distill.distill.methods.config import MethodConfig


class TrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(600, ge=1)  # optimizer steps per phase; toy student: 600, about 3 CPU-minutes;
    # SD 1.5 needs ~10k
    batch_size: int = Field(8, ge=1)  # micro-batch per process; effective batch = batch_size x grad_accum x processes
    grad_accum: int = Field(1, ge=1)  # micro-batches accumulated per optimizer step
    lr: float = Field(2e-5, gt=0)  # peak AdamW learning rate; toy student (200 prompts): FID 102.3 at 2e-5 vs 123.8
    # at 1e-4 (the teacher's own 8 steps: 111.4); 1e-5 is the usual value for SD-sized students
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up: flat, cosine or linear decay
    warmup_steps: int = Field(0, ge=0)  # linear warm-up from lr/warmup_steps to lr over this many steps
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine/linear decay ends at lr x this
    weight_decay: float = Field(0.0, ge=0)  # AdamW decoupled weight decay; 0 as in SnapFusion/BK-SDM fine-tuning
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW (beta1, beta2), PyTorch defaults
    adam_eps: float = 1e-8  # AdamW epsilon, PyTorch default
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast dtype (trainable weights stay fp32); bf16 on GPUs
    gradient_checkpointing: bool = False  # recompute UNet block activations in backward: ~30% slower, far less memory
    ema_decay: Optional[float] = None  # EMA of the student's weights (e.g. 0.9999); None = off; exported when on
    checkpoint_every: int = Field(100, ge=1)  # optimizer steps between checkpoints (a last one is always written)
    keep_checkpoints: int = Field(2, ge=1)  # newest checkpoints kept on disk
    max_grad_norm: Optional[float] = 1.0  # global gradient-norm clip; None = no clipping
    seed: int = 0  # seeds torch/numpy/python, the data order and the loss generator (offset by process rank)
    nan_patience: int = Field(0, ge=0)  # consecutive bad steps (NaN/inf or exploding loss) skipped before stopping
    loss_explode_factor: Optional[float] = 100.0  # a loss above this x its running mean is bad; None = NaN/inf only
    log_every: int = Field(10, ge=1)  # optimizer steps between progress lines
    num_processes: int = Field(1, ge=1)  # processes for `accelerate launch --multi_gpu --num_processes` (GPUs; gloo on CPU)
    device: Optional[str] = None  # None = accelerate's choice (GPU when present); "cpu" forces the CPU
    # --- speed: none of these changes what is trained (tests/distill/test_speed_options.py pins the loss sequence)
    channels_last: bool = False  # student and teacher UNet weights in channels_last memory format (faster convs on
    # tensor cores); off keeps the CPU default unchanged
    compile_unets: Literal["off", "full", "regional"] = "off"  # torch.compile the student and the frozen teacher UNet:
    # "full" the whole forward, "regional" each repeated block (transformer and resnet blocks: shorter compile,
    # one graph reused by every block of a shape); off = eager PyTorch
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = None
    # torch.compile mode; None = PyTorch's default
    compile_backend: str = "inductor"  # torch.compile backend (torch._dynamo.list_backends()); "inductor" generates
    # kernels, "aot_eager" traces without code generation (what the CPU tests use)
    fused_adamw: Optional[bool] = None  # AdamW's fused kernel: None = fused on CUDA, PyTorch's default elsewhere
    nan_check_every: int = Field(1, ge=1)  # optimizer steps between host reads of the NaN guard: 1 = every step
    # (reads the loss each step); N > 1 = the guard runs on the device, a bad step's update is skipped there by the
    # fused AdamW (found_inf), and losses reach the host every N steps (and at log / checkpoint steps): no host
    # sync inside the step. Needs the fused AdamW (fused_adamw not false) and mixed_precision other than fp16

    @model_validator(mode="after")
    def _check(self) -> "TrainerConfig":
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be in (0, 1) or None (off), got {self.ema_decay}")
        if self.loss_explode_factor is not None and self.loss_explode_factor <= 1.0:
            raise ValueError(f"trainer.loss_explode_factor must be > 1 or None, got {self.loss_explode_factor}")
        if self.nan_check_every > 1 and self.fused_adamw is False:
            raise ValueError("trainer.nan_check_every > 1 skips bad steps inside the fused AdamW: set trainer.fused_adamw "
                             "to true or null (or nan_check_every to 1)")
        if self.nan_check_every > 1 and self.mixed_precision == "fp16":
            raise ValueError("trainer.nan_check_every > 1 is for mixed_precision 'no' / 'bf16'; with 'fp16' the gradient "
                             "scaler reads the gradients every step anyway: use nan_check_every 1")
        return self


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resolution: Optional[int] = Field(None, ge=8)  # pixels; None = the teacher's own (512 for SD 1.5, 32 for toy:sd)
    caption_column: str = "caption"  # curated column with the training text (docs/design.md: the cleaned caption)
    max_samples: Optional[int] = Field(None, ge=1)  # cap on curated rows read; None = all
    negative_prompt: str = ""  # the unconditional prompt of classifier-free guidance (SD's empty prompt)
    cache_latents: bool = True  # VAE-encode once in the cache step; False caches pixels and encodes every step
    sample_posterior: bool = False  # draw z ~ N(mean, std) each step instead of the posterior mean
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float16"  # storage dtype of cached tensors (half the disk)
    cache_batch_size: int = Field(16, ge=1)  # images per VAE / text-encoder batch in the cache step
    shard_rows: int = Field(1024, ge=1)  # samples per cache shard file


class DistillParams(BaseModel):
    """The whole distill stage: teacher, method, trainer and data (JSON-friendly)."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = "toy:sd"  # diffusers pipeline folder, hub id, or toy:<name>
    method: MethodConfig = Field(default_factory=MethodConfig)  # distillation method (its defaults: MethodConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)  # optimisation and the training loop's hooks
    data: DataConfig = Field(default_factory=DataConfig)  # latent cache built from the curated shards


RESERVED_STUDENT_NAMES = ("teacher", "student")


def check_extra_students(main: DistillParams, extra: dict[str, DistillParams]) -> None:
    """More students from the same curated set (e.g. a BK-SDM block-removed one beside the same-architecture one):
    each name labels its report rows and image folders, and all of them are compared with the one teacher."""
    for name, params in extra.items():
        if name in RESERVED_STUDENT_NAMES or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise ValueError(f"extra student name {name!r}: use letters, digits, '-', '_', '.', and not "
                             f"{list(RESERVED_STUDENT_NAMES)}")
        if params.teacher != main.teacher:
            raise ValueError(f"extra student {name!r} distils {params.teacher!r} but the run's teacher is "
                             f"{main.teacher!r}: every student of a run is compared with the one teacher")
