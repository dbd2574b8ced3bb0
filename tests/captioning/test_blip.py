"""BLIP captioner: a tiny trained BlipForConditionalGeneration loaded through the real code path."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from sd_distill.captioning.blip import load_captioner
from tests._fixtures_scoring import SCENES


def scene_images():
    return [Image.new("RGB", (48, 40), colour) for colour, _ in SCENES]


def test_tiny_blip_captions_each_image_with_what_it_learned(tiny_blip_dir):
    captioner = load_captioner(str(tiny_blip_dir), prompt="a picture of", max_new_tokens=8)
    assert captioner.name == "BlipForConditionalGeneration" and captioner.family == "blip"
    assert captioner.caption(scene_images()) == [caption for _, caption in SCENES]  # prompt stripped


def test_unconditional_captions_keep_the_whole_text(tiny_blip_dir):
    captioner = load_captioner(str(tiny_blip_dir), prompt=None, max_new_tokens=8)
    captions = captioner.caption(scene_images())
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert captions[0] != captions[1]  # depends on the image


def test_batched_captions_equal_one_by_one(tiny_blip_dir):
    captioner = load_captioner(str(tiny_blip_dir), prompt="a picture of", max_new_tokens=8)
    images = scene_images() + [Image.new("L", (20, 50), 90), Image.new("RGBA", (33, 33), (0, 0, 255, 128))]
    done = []
    batched = captioner.caption(images, batch_size=2, progress=lambda d, t, m: done.append((d, t)))
    single = [captioner.caption([im], batch_size=1)[0] for im in images]
    assert batched == single
    assert done == [(2, 5), (4, 5), (5, 5)]


def test_toy_ref_loads_the_same_model(tiny_blip_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_blip_dir, tmp_path / "blip")
    monkeypatch.setattr("sd_distill.modelref.TOY_ASSETS", tmp_path)
    captioner = load_captioner("toy:blip", prompt="a picture of", max_new_tokens=8)
    assert captioner.caption(scene_images()[:1]) == [SCENES[0][1]]


def test_bad_refs_and_arguments_fail_clearly(tmp_path, tiny_blip_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_captioner(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="SD_DISTILL_ALLOW_DOWNLOAD"):
        load_captioner("nobody/no-such-captioner")
    with pytest.raises(ValueError, match="dtype 'float8' is not one of"):
        load_captioner(str(tiny_blip_dir), dtype="float8")
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                         vocab_size=10)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'bert' is not an image-text-to-text model"):
        load_captioner(str(tmp_path / "bert"))
