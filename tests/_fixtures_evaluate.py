"""Shared fixtures of the evaluate tests: tiny SD pipelines, metric models and prompt files in the real formats.

Import the fixtures by name in a test module (``from tests._fixtures_evaluate import tiny_teacher, ...``).
Everything is built once per session under a pytest temporary folder, through the libraries' own
save functions, and loaded back through the code paths real checkpoints use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "above", "below", "a", "an"]
COLORS = ["red", "blue", "green"]
SHAPES = ["circle", "square", "triangle"]


def write_coco_fixture(root: Path, n_images: int = 12, size=(40, 36)) -> tuple[Path, Path]:
    """``annotations/captions_val2017.json`` + ``val2017/<id:012d>.png`` in COCO's layout.

    Images are listed out of id order and each has two captions whose first (lowest annotation id)
    is the ``"first"``-marked one, so the loader's ordering rules are observable.
    """
    rng = np.random.default_rng(0)
    val = root / "val2017"
    val.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    from PIL import Image

    images, annotations = [], []
    ids = [1000 + 7 * i for i in range(n_images)][::-1]  # descending: the loader must sort
    for k, image_id in enumerate(ids):
        name = f"{image_id:012d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(val / name)
        images.append({"id": image_id, "file_name": name, "height": size[1], "width": size[0],
                       "coco_url": f"http://images.cocodataset.org/val2017/{name}"})
        caption = f"a {COLORS[k % 3]} {SHAPES[(k // 3) % 3]}"
        annotations.append({"image_id": image_id, "id": 50000 + 2 * k + 1, "caption": f"second {caption}"})
        annotations.append({"image_id": image_id, "id": 50000 + 2 * k, "caption": f" first {caption} "})
    captions = root / "annotations" / "captions_val2017.json"
    captions.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return captions, val


def write_hpsv2_fixture(root: Path, per_style: int = 3) -> Path:
    """``<style>.json`` JSON lists of prompts for the four HPSv2 benchmark styles."""
    root.mkdir(parents=True, exist_ok=True)
    for s, style in enumerate(["anime", "concept-art", "paintings", "photo"]):
        prompts = [f"a {COLORS[(s + i) % 3]} {SHAPES[i % 3]} above a {COLORS[i % 3]} square" for i in range(per_style)]
        (root / f"{style}.json").write_text(json.dumps(prompts))
    return root


def save_random_fid_inception(path: Path, seed: int = 0) -> Path:
    """An FID-InceptionV3 state dict with random weights (and non-trivial batch-norm statistics)."""
    from sd_distill.evaluate.metrics.inception import FIDInceptionV3

    torch.manual_seed(seed)
    model = FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def eval_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evaluate_fixtures")


@pytest.fixture(scope="session")
def tiny_teacher(eval_root) -> Path:
    """An epsilon-prediction tiny SD pipeline folder (CFG: two UNet evaluations per step)."""
    from sd_distill.tiny.sd import build_tiny_sd_pipeline

    folder = eval_root / "teacher"
    build_tiny_sd_pipeline(folder, prediction_type="epsilon", words=WORDS, seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_student(eval_root) -> Path:
    """A w-conditioned tiny student (``time_cond_proj_dim`` set: one UNet evaluation per step), smaller UNet."""
    from sd_distill.tiny.sd import build_tiny_sd_pipeline

    folder = eval_root / "student"
    build_tiny_sd_pipeline(folder, prediction_type="epsilon", words=WORDS, unet_blocks=(32, 32, 64),
                           layers_per_block=1, time_cond_proj_dim=32, seed=3)
    (folder / "distill_config.json").write_text(json.dumps({"method": "w_conditioned", "teacher": "teacher"}))
    return folder


@pytest.fixture(scope="session")
def coco_fixture(eval_root) -> tuple[Path, Path]:
    return write_coco_fixture(eval_root / "coco")


@pytest.fixture(scope="session")
def hpsv2_fixture(eval_root) -> Path:
    return write_hpsv2_fixture(eval_root / "hps_benchmark")


@pytest.fixture(scope="session")
def fid_inception_weights(eval_root) -> Path:
    return save_random_fid_inception(eval_root / "inception" / "weights-inception-2015-12-05-6726825d.pth")


@pytest.fixture(scope="session")
def tiny_clip_folder(eval_root) -> Path:
    """A tiny open_clip model in the hub layout (+ an HPS_v2.1_compressed.pt of the same weights)."""
    from sd_distill.tiny.clip import build_tiny_open_clip

    return build_tiny_open_clip(eval_root / "clip", name="tiny-eval-clip", seed=0)


@pytest.fixture(scope="session")
def tiny_classifier_folder(eval_root) -> Path:
    """A random small toy attribute classifier saved with its own save_pretrained (a fast FID / IS feature model)."""
    from sd_distill.toy.classifier import ToyAttributeClassifier

    torch.manual_seed(0)
    return ToyAttributeClassifier(image_size=32, widths=(8, 16), feature_dim=16).save_pretrained(eval_root / "classifier")
