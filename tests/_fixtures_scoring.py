"""Shared fixtures for the scoring and captioning tests: tiny open_clip and BLIP models, sample images,
and the reference hpsv2 package's own open_clip code (when installed)."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_distill.tiny.blip import build_tiny_blip
from sd_distill.tiny.clip import build_tiny_open_clip

HPSV2_INSTALL = "pip install --no-deps hpsv2==1.2.0"
SCENES = [("red", "a red circle"), ("blue", "a blue square"), ("green", "a green triangle")]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random tiny open_clip CLIP in the hub layout + HPS_v2.1_compressed.pt + tiny-hps-vit.json."""
    return build_tiny_open_clip(tmp_path_factory.mktemp("tiny_clip"), name="tiny-hps-vit")


def trained_tiny_blip(folder: Path, steps: int = 25) -> Path:
    """A tiny BLIP overfit on three solid-colour images so its captions depend on the image."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    build_tiny_blip(folder)
    model = BlipForConditionalGeneration.from_pretrained(folder)
    processor = BlipProcessor.from_pretrained(folder)
    images = [Image.new("RGB", (32, 32), colour) for colour, _ in SCENES]
    batch = processor(images=images, text=[f"a picture of {c}" for _, c in SCENES], return_tensors="pt",
                      padding=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster on a busy machine
    try:
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=8e-3)
        model.train()
        for _ in range(steps):
            loss = model(pixel_values=batch.pixel_values, input_ids=batch.input_ids,
                         attention_mask=batch.attention_mask, labels=batch.input_ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory) -> Path:
    return trained_tiny_blip(tmp_path_factory.mktemp("tiny_blip"))


def sample_images() -> list[Image.Image]:
    """Images of several sizes, aspect ratios and modes (all with the long side != 32, see hps.py)."""
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (20, 64), (33, 33), (17, 9), (128, 96), (48, 48)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    images.append(Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), mode="L"))
    images.append(images[0].convert("P"))
    return images


PROMPTS = ["a red circle", "a blue square above a green triangle", "stock photo", "x", "a photo of a cat",
           "", "two small yellow circles next to each other on a gray background", "red"]


def import_hpsv2_open_clip():
    """hpsv2's bundled open_clip fork (``hpsv2.src.open_clip``), or skip the test when hpsv2 is absent.

    hpsv2 1.2.0 cannot be imported as shipped offline: its ``__init__`` imports ``clint`` (a progress bar
    for downloads, not a declared need of the model code) and its tokenizer module reads a BPE vocabulary
    file the wheel does not contain. The stub below stands in for ``clint``; the tokenizer module is
    hpsv2's own code, executed with ``__file__`` set inside open_clip so it reads the identical vocabulary
    file open_clip ships (``bpe_simple_vocab_16e6.txt.gz``).
    """
    spec = importlib.util.find_spec("hpsv2")
    if spec is None:
        pytest.skip(f"hpsv2 is not installed; the parity test needs it: {HPSV2_INSTALL}")
    if "hpsv2.src.open_clip" in sys.modules:
        return sys.modules["hpsv2.src.open_clip"]
    import open_clip

    if "clint" not in sys.modules:
        clint, textui = types.ModuleType("clint"), types.ModuleType("clint.textui")
        textui.progress = None
        clint.textui = textui
        sys.modules.update({"clint": clint, "clint.textui": textui})
    name = "hpsv2.src.open_clip.tokenizer"
    pkg = os.path.dirname(spec.origin)
    tok_spec = importlib.util.spec_from_file_location(name, os.path.join(pkg, "src", "open_clip", "tokenizer.py"))
    module = importlib.util.module_from_spec(tok_spec)
    module.__file__ = os.path.join(os.path.dirname(open_clip.__file__), "tokenizer.py")
    sys.modules[name] = module
    tok_spec.loader.exec_module(module)
    import hpsv2.src.open_clip as hps_open_clip

    return hps_open_clip
