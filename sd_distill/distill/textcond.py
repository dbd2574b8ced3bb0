"""The text side of a teacher as one value: ``TextCond`` (hidden states + SDXL's added conditioning).

SD 1.x / 2.x UNets take the text as ``encoder_hidden_states`` [B, L, D] only; the methods pass plain tensors for
them and nothing here is involved (those paths stay bit-identical). An SDXL UNet (``addition_embed_type=
"text_time"``) also needs ``added_cond_kwargs = {"text_embeds": pooled [B, P], "time_ids": [B, 6]}`` (Podell et
al. 2023, sec. 2.1-2.2: the pooled embedding of text encoder 2 and the micro-conditioning original size, crop
top-left, target size). ``TextCond`` carries the three together and behaves like the hidden-state tensor where
the methods and :mod:`sd_distill.diffusion.sampling` handle text:

* ``cond.shape`` / ``cond.expand(n, ...)`` / ``cond.to(dtype)`` / ``.float()`` / ``.cpu()`` / ``cond[i]`` /
  ``cond.chunk(k)`` act on all parts;
* ``torch.cat([uncond, cond])`` and ``torch.where(mask, a, b)`` concatenate / select all parts row-wise, so a CFG
  batch (uncond rows, then cond rows) pairs each hidden state with its own pooled embedding and time ids, exactly
  as ``StableDiffusionXLPipeline`` builds it.

A UNet receives it through ``accept_text_cond(unet)``: a forward pre-hook that turns
``encoder_hidden_states=TextCond`` into ``encoder_hidden_states=cond.hidden`` plus ``added_cond_kwargs``
(:func:`unet_kwargs`). The hook is needed because the guided UNet call lives in ``sd_distill.diffusion.sampling``
(``guided_prediction``), which passes text only as ``encoder_hidden_states``; with ``unet_kwargs`` there the hook
could go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

HOOK_ATTR = "_sd_distill_text_cond_hook"


@dataclass
class TextCond:
    """hidden [B, L, D] (``encoder_hidden_states``); pooled [B, P] and time_ids [B, 6] for SDXL, else None."""

    hidden: Tensor
    pooled: Optional[Tensor] = None
    time_ids: Optional[Tensor] = None

    def __post_init__(self):
        if (self.pooled is None) != (self.time_ids is None):
            raise ValueError("TextCond needs both pooled and time_ids (SDXL) or neither (SD 1.x / 2.x)")
        for name in ("pooled", "time_ids"):
            part = getattr(self, name)
            if part is not None and part.shape[0] != self.hidden.shape[0]:
                raise ValueError(f"TextCond.{name} has {part.shape[0]} rows but hidden has {self.hidden.shape[0]}")

    # ---- tensor-like behaviour, applied to every part ------------------------------------------------
    def parts(self) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        return self.hidden, self.pooled, self.time_ids

    def _map(self, fn) -> "TextCond":
        return TextCond(*(None if p is None else fn(p) for p in self.parts()))

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def expand(self, n: int, *_rest) -> "TextCond":
        """Rows broadcast to ``n`` (the trailing sizes of ``hidden.expand(n, L, D)`` are implied)."""
        return self._map(lambda x: x.expand(n, *x.shape[1:]))

    def to(self, *args, **kwargs) -> "TextCond":
        return self._map(lambda x: x.to(*args, **kwargs))

    def float(self) -> "TextCond":
        return self._map(lambda x: x.float())

    def cpu(self) -> "TextCond":
        return self._map(lambda x: x.cpu())

    def __getitem__(self, index) -> "TextCond":
        return self._map(lambda x: x[index])

    def chunk(self, chunks: int) -> tuple["TextCond", ...]:
        n = self.hidden.shape[0]
        size = -(-n // chunks)
        return tuple(self[i : i + size] for i in range(0, n, size))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.cat, torch.concat):
            parts = list(args[0])
            if kwargs.get("dim", args[1] if len(args) > 1 else 0) != 0:
                raise ValueError("TextCond concatenates along the batch dimension (dim 0) only")
            if not all(isinstance(p, TextCond) for p in parts):
                raise TypeError("torch.cat mixes TextCond and plain tensors; encode every text side the same way")
            return TextCond(*(None if parts[0].parts()[k] is None else torch.cat([p.parts()[k] for p in parts])
                              for k in range(3)))
        if func is torch.where and len(args) == 3 and all(isinstance(a, TextCond) for a in args[1:]):
            mask, a, b = args
            rows = mask.reshape(-1)

            def pick(x, y):
                return torch.where(rows.reshape(-1, *([1] * (x.dim() - 1))), x, y)

            return TextCond(*(None if x is None else pick(x, y) for x, y in zip(a.parts(), b.parts())))
        raise TypeError(f"{func.__name__} is not defined for TextCond (supported: torch.cat on dim 0, torch.where)")


def unet_kwargs(text: Tensor | TextCond) -> dict:
    """The UNet keyword arguments carrying ``text``: ``encoder_hidden_states`` (+ ``added_cond_kwargs`` for SDXL)."""
    if not isinstance(text, TextCond):
        return {"encoder_hidden_states": text}
    kwargs = {"encoder_hidden_states": text.hidden}
    if text.pooled is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": text.pooled, "time_ids": text.time_ids}
    return kwargs


def _unpack_text_cond(module, args, kwargs):
    """Forward pre-hook: ``(sample, timestep, TextCond)`` or ``encoder_hidden_states=TextCond`` -> UNet kwargs."""
    if len(args) > 2 and isinstance(args[2], TextCond):
        args, kwargs = args[:2] + args[3:], {**kwargs, "encoder_hidden_states": args[2]}
    text = kwargs.get("encoder_hidden_states")
    if not isinstance(text, TextCond):
        return None
    return args, {**kwargs, **unet_kwargs(text)}


def accept_text_cond(unet):
    """Let ``unet`` take a ``TextCond`` as ``encoder_hidden_states`` (idempotent; plain tensors pass untouched).

    The hook survives ``copy.deepcopy`` (students are copies of the teacher UNet) but not ``save_pretrained``:
    saved UNets are stock diffusers models.
    """
    if getattr(unet, HOOK_ATTR, None) is None:
        setattr(unet, HOOK_ATTR, unet.register_forward_pre_hook(_unpack_text_cond, with_kwargs=True))
    return unet


def is_sdxl_unet(unet) -> bool:
    """True for a UNet with SDXL's added text/time conditioning."""
    return unet.config.get("addition_embed_type") == "text_time"
