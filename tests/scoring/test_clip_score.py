"""CLIP score: torchmetrics' functional clip_score on the same open_clip model, and the per-pair form."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from sd_distill.scoring.clip_score import clip_cosines, clip_score, clip_scores, load_open_clip
from tests._fixtures_scoring import PROMPTS, sample_images


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return load_open_clip(str(tiny_clip_dir))


class _TorchmetricsAdapter(torch.nn.Module):
    """The (model, processor) interface torchmetrics' clip_score calls, over an open_clip model."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.inner = clip.model
        self.config = types.SimpleNamespace()

    def get_image_features(self, pixel_values):
        return self.inner.encode_image(pixel_values)

    def get_text_features(self, input_ids, attention_mask=None):
        return self.inner.encode_text(input_ids)

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True):  # the processor role
        if images is not None:
            pil = [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in images]
            return {"pixel_values": torch.stack([self.clip.preprocess(im) for im in pil])}
        ids = self.clip.tokenizer(text)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_set_score_equals_torchmetrics_clip_score(clip):
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    images = [im.convert("RGB") for im in sample_images()]
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous() for im in images]
    adapter = _TorchmetricsAdapter(clip)
    with torch.no_grad():
        expected = float(tm_clip_score(tensors, PROMPTS, lambda: (adapter, adapter)))
    assert clip_score(clip, images, PROMPTS, batch_size=3) == pytest.approx(expected, abs=1e-4)


def test_per_pair_scores_are_100_times_clamped_cosine(clip):
    images = sample_images()
    pixels = torch.stack([clip.preprocess(im.convert("RGB")) for im in images])
    with torch.no_grad():
        img = clip.model.encode_image(pixels)
        txt = clip.model.encode_text(clip.tokenizer(PROMPTS))
    cos = torch.nn.functional.cosine_similarity(img, txt).numpy()
    np.testing.assert_allclose(clip_cosines(clip, images, PROMPTS), cos, atol=1e-6)
    np.testing.assert_allclose(clip_scores(clip, images, PROMPTS), 100 * np.maximum(cos, 0), atol=1e-4)
    assert (cos < 0).any() and (cos > 0).any()  # the clamp matters on these pairs
    # torchmetrics' set score clamps the mean, not each pair
    assert clip_score(clip, images, PROMPTS) == pytest.approx(max(100 * cos.mean(), 0.0), abs=1e-4)


def test_clip_score_rejects_mismatched_and_empty_input(clip):
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(clip, sample_images()[:2], ["a"])
    with pytest.raises(ValueError, match="empty set"):
        clip_score(clip, [], [])
