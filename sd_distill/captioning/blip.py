"""Batched image captioning with the BLIP family and other image-text-to-text models in transformers.

salesforce-lavis pins transformers<4.27 and cannot live next to current transformers / diffusers, so
BLIP (``BlipForConditionalGeneration``), BLIP-2 (``Blip2ForConditionalGeneration``), InstructBLIP
(``InstructBlipForConditionalGeneration``) and chat-style vision-language models all load through
``transformers.AutoModelForImageTextToText`` + ``AutoProcessor``. How the prompt is used depends on the
model family:

* ``blip``: the prompt is a caption prefix (conditional captioning, e.g. "a picture of"); None = unconditional;
* ``blip-2``: the prompt is the language model's text after the image, e.g. MiniGPT-4-style
  "Question: Describe this image in detail. Answer:"; None = unconditional;
* ``instructblip``: the prompt is the instruction (default :data:`DEFAULT_INSTRUCTION`);
* anything else: the prompt is a user message with the image, through the processor's chat template.

The prompt is stripped from the returned captions.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
from PIL import Image

from sd_distill.modelref import allow_download, hub_kwargs, resolve_model_ref
from sd_distill.progress import ProgressFn, report

DEFAULT_INSTRUCTION = "Write a short description for the image."
DETAILED_PROMPT = "Describe this image in detail."  # MiniGPT-4's detailed-description instruction style
PREFIX_FAMILIES = ("blip", "blip-2")  # the prompt is text the caption continues
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


class Captioner:
    """A loaded captioning model: ``caption(images) -> list[str]``. Build it with :func:`load_captioner`."""

    def __init__(self, model, processor, family: str, prompt: Optional[str], max_new_tokens: int,
                 device: str, source: str, num_beams: int = 1):
        self.model = model
        self.processor = processor
        self.family = family
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device)
        self.source = source
        self.num_beams = num_beams
        self.name = type(model).__name__

    def _text(self) -> Optional[str]:
        """The text input for one image: prefix, instruction or chat-templated message."""
        if self.family in PREFIX_FAMILIES or self.family == "instructblip":
            return self.prompt
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def _inputs(self, images: list[Image.Image]):
        text = self._text()
        kwargs = {"images": images, "return_tensors": "pt"}
        if text is not None:
            kwargs["text"] = [text] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        dtype = next(self.model.parameters()).dtype
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs

    def _decode(self, sequences: torch.Tensor, input_ids: Optional[torch.Tensor]) -> list[str]:
        if input_ids is not None and sequences.shape[1] > input_ids.shape[1] and \
                torch.equal(sequences[:, :input_ids.shape[1]], input_ids):
            sequences = sequences[:, input_ids.shape[1]:]  # decoder-only models echo the prompt tokens
        texts = self.processor.batch_decode(sequences, skip_special_tokens=True)
        prefix = _normalised(self.prompt) if self.prompt and self.family in PREFIX_FAMILIES else ""
        out = []
        for text in texts:
            text = re.sub(r"\s+", " ", text).strip()
            if prefix and _normalised(text).startswith(prefix):
                text = text[len(prefix):].strip() if text.lower().startswith(prefix) else \
                    " ".join(text.split()[len(prefix.split()):])
            out.append(text)
        return out

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image], batch_size: int = 16,
                progress: Optional[ProgressFn] = None) -> list[str]:
        """One caption per image, in order, generated ``batch_size`` images at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        captions: list[str] = []
        for start in range(0, len(images), batch_size):
            batch = [im if im.mode == "RGB" else im.convert("RGB") for im in images[start:start + batch_size]]
            inputs = self._inputs(batch)
            sequences = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                            num_beams=self.num_beams, do_sample=False)
            captions.extend(self._decode(sequences, inputs.get("input_ids")))
            report(progress, len(captions), len(images), f"captioned with {self.name}")
        return captions


def load_captioner(
    ref: str,
    prompt: Optional[str] = None,
    max_new_tokens: int = 30,
    device: str = "cpu",
    dtype: str = "float32",
    num_beams: int = 1,
) -> Captioner:
    """Load a captioner once from a transformers model folder, ``toy:<name>`` or a hub id.

    ``prompt``: caption prefix (BLIP), text after the image (BLIP-2), instruction (InstructBLIP) or user
    message (chat models); None uses each family's default (unconditional for BLIP / BLIP-2).
    ``dtype``: one of :data:`DTYPES`. Greedy decoding unless ``num_beams`` > 1.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor  # deferred: heavy (transformers)

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    local = resolve_model_ref(ref)
    kwargs = {} if local != ref or not _looks_like_hub_id(ref) else hub_kwargs()
    try:
        config = AutoConfig.from_pretrained(local, **kwargs)
    except OSError as err:
        hint = "" if allow_download() else " (downloads are off: set SD_DISTILL_ALLOW_DOWNLOAD=1 to fetch it)"
        raise FileNotFoundError(f"captioner {ref!r}: no transformers config.json in a local folder and not "
                                f"loadable from the hub{hint}: {err}") from err
    family = config.model_type
    try:
        model = AutoModelForImageTextToText.from_pretrained(local, dtype=DTYPES[dtype], **kwargs)
    except ValueError as err:
        raise ValueError(f"captioner {ref!r}: model type {family!r} is not an image-text-to-text model in "
                         f"transformers (BLIP, BLIP-2, InstructBLIP, LLaVA, ...): {err}") from err
    processor = AutoProcessor.from_pretrained(local, **kwargs)
    if family == "instructblip" and prompt is None:
        prompt = DEFAULT_INSTRUCTION
    if family not in PREFIX_FAMILIES and family != "instructblip":
        if prompt is None:
            prompt = DETAILED_PROMPT
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(f"captioner {ref!r} ({family}) has no chat template; only BLIP, BLIP-2 and "
                             f"InstructBLIP work without one")
        if getattr(processor, "tokenizer", None) is not None:
            processor.tokenizer.padding_side = "left"
    model = model.to(device).eval()
    return Captioner(model, processor, family, prompt, max_new_tokens, device, local, num_beams)


def _looks_like_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
