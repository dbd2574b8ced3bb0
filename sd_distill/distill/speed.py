"""The training step's speed options (``TrainerConfig``'s speed fields), each a change of how, not what, is computed.

* ``to_channels_last``: UNet weights in NHWC (channels_last) memory format; convolutions on tensor cores read NHWC
  without transposes. Inputs stay NCHW: the first convolution returns NHWC and the rest of the UNet follows.
* ``compile_unet``: ``torch.compile`` in place (``nn.Module.compile``, so parameter names, ``state_dict`` and
  ``save_pretrained`` are unchanged): the whole forward (``"full"``), or each repeated block (``"regional"``:
  every transformer / resnet block, the modules the UNet repeats; one compiled graph serves every block of the
  same class and input shape, so compilation is much shorter than for the whole UNet).
* ``make_adamw``: ``torch.optim.AdamW`` with its fused kernel on CUDA by default. The fused kernel also reads an
  on-device ``found_inf`` flag and skips the update when it is set (how fp16's gradient scaler skips a step), which
  is what lets the NaN guard decide on the device (``DeviceNanGuard``): :func:`skip_step_on_device`.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

COMPILE_CHOICES = ("off", "full", "regional")
# the repeated blocks of diffusers' UNet2DConditionModel (and of its SDXL / block-removed variants)
REGIONAL_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
REGIONAL_RECOMPILE_LIMIT = 64  # graphs per block class (see compile_unet)


def to_channels_last(unet: torch.nn.Module) -> torch.nn.Module:
    """Every 4-d weight of ``unet`` in channels_last memory format (in place); returns ``unet``."""
    return unet.to(memory_format=torch.channels_last)


def compile_unet(unet: torch.nn.Module, how: str, mode: Optional[str] = None, backend: str = "inductor") -> int:
    """``torch.compile`` ``unet`` in place; returns the number of modules compiled (0 for ``"off"``).

    Fails naming the valid choices for an unknown ``how`` or ``backend``."""
    if how not in COMPILE_CHOICES:
        raise ValueError(f"trainer.compile_unets {how!r} is not one of {list(COMPILE_CHOICES)}")
    if how == "off":
        return 0
    import torch._dynamo  # deferred: heavy (torch._dynamo)

    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ValueError(f"trainer.compile_backend {backend!r} is not a torch.compile backend; valid: {sorted(backends)}")
    kwargs = {"backend": backend}
    if mode is not None:
        kwargs["mode"] = mode
    if how == "full":
        unet.compile(**kwargs)
        return 1
    blocks = [m for m in unet.modules() if type(m).__name__ in REGIONAL_BLOCKS]
    if not blocks:
        raise ValueError(f"regional compilation found none of the blocks {list(REGIONAL_BLOCKS)} in "
                         f"{type(unet).__name__}; use trainer.compile_unets 'full'")
    # one block class serves every resolution level, channel width and batch shape (2B student / CFG teacher rows,
    # 3B for the shared CFG + conditional teacher forward): more graphs than dynamo's default limit of 8 per
    # function, past which it would silently run the rest eagerly
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, REGIONAL_RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(**kwargs)
    return len(blocks)


def use_fused_adamw(setting: Optional[bool], device: torch.device, lazy_guard: bool) -> bool:
    """The effective ``fused`` flag: the setting when given, else on CUDA or when the NaN guard runs on the device."""
    if setting is not None:
        return setting
    return device.type == "cuda" or lazy_guard


def make_adamw(params: Iterable[torch.nn.Parameter], cfg, device: torch.device, lazy_guard: bool = False):
    """AdamW with the trainer's hyper-parameters; fused per :func:`use_fused_adamw`, else PyTorch's default choice."""
    fused = use_fused_adamw(cfg.fused_adamw, device, lazy_guard)
    return torch.optim.AdamW(list(params), lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))


def skip_step_on_device(optimizer, skip: torch.Tensor) -> None:
    """Make the next ``optimizer.step()`` of a fused AdamW skip its update when the device flag ``skip`` is True.

    The fused kernel undoes its step count and leaves weights and moments untouched when ``found_inf`` is 1
    (``torch._fused_adamw_``'s contract, which ``GradScaler`` relies on); nothing is read back to the host."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    if not inner.defaults.get("fused"):
        raise ValueError("skipping a step on the device needs the fused AdamW (trainer.fused_adamw true or null)")
    inner.found_inf = skip.to(torch.float32).reshape(())
