"""The reference ``hpsv2.score`` calling pattern, for the benchmark's baseline.

``hpsv2.score(images, prompt, cp)`` builds the architecture once per process, but on every call it
``torch.load``s the checkpoint from disk, loads it into the model, builds the tokenizer, and then runs
one forward pass per image (batch size 1, image and text tower each time). This class repeats exactly
that work per call, with the same weights and preprocessing as :class:`~sd_distill.scoring.hps.HPSScorer`,
so the benchmark measures what batching and loading once save, not a difference in the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
from PIL import Image

from sd_distill.scoring.hps import hps_pixels
from sd_distill.scoring.openclip import _arch_name, _bundle, _build, _state_dict_from_file


class PerCallHPS:
    """hpsv2.score's per-call path: reload the checkpoint every call, score one image per forward."""

    def __init__(self, checkpoint: str | Path, arch: str = "ViT-H-14", device: str = "cpu", precision: str = "fp32"):
        self.checkpoint = Path(checkpoint)
        self.name = _arch_name(arch)
        model, preprocess, tokenizer = _build(self.name, device, "fp32", load_weights=False)  # once per process
        # "amp" autocasts like hpsv2's `torch.cuda.amp.autocast()`; weights stay fp32 as hpsv2 keeps them
        self.clip = _bundle(model, preprocess, tokenizer, str(checkpoint), arch, precision, device)

    def score(self, images: Sequence[Image.Image], prompt: str) -> np.ndarray:
        """HPS of each image against one prompt, reloading the checkpoint first (as hpsv2.score does)."""
        self.clip.model.load_state_dict(_state_dict_from_file(self.checkpoint))
        self.clip.tokenizer = open_clip.get_tokenizer(self.name)
        scores = []
        for image in images:
            pixels = hps_pixels(image, self.clip.image_size, self.clip.mean, self.clip.std)[None]
            with torch.no_grad():
                img = self.clip.encode_pixels(pixels)
                txt = self.clip.encode_texts([prompt])
            scores.append(float((img @ txt.T)[0, 0]))
        return np.asarray(scores, dtype=np.float32)
