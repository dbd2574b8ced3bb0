"""HPSv2 scorer: parity with hpsv2's own code path, every ref kind, batching, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sd_distill.scoring.hps import HPS_FILES, hps_pixels, load_hps_scorer
from sd_distill.scoring.hps_per_call import PerCallHPS
from sd_distill.tiny.clip import tiny_open_clip_config
from tests._fixtures_scoring import PROMPTS, import_hpsv2_open_clip, sample_images

CKPT = HPS_FILES["v2.1"]


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir):
    return load_hps_scorer(str(tiny_clip_dir))


def hpsv2_reference_scores(folder, images, prompts):
    """Scores the way hpsv2.img_score.score computes them, through hpsv2's own open_clip fork."""
    oc = import_hpsv2_open_clip()
    oc.add_model_config(folder / "tiny-hps-vit.json")
    # the arguments of hpsv2.img_score.initialize_model, with the tiny architecture
    model, _, preprocess_val = oc.create_model_and_transforms(
        "tiny-hps-vit", None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    checkpoint = torch.load(folder / CKPT, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    tokenizer = oc.get_tokenizer("tiny-hps-vit")
    model.eval()
    out = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            outputs = model(preprocess_val(image).unsqueeze(0), tokenizer([prompt]))
            logits = outputs["image_features"] @ outputs["text_features"].T
            out.append(float(torch.diagonal(logits)[0]))
    return np.asarray(out, dtype=np.float32)


def test_scores_match_hpsv2_code_path_on_same_weights(scorer, tiny_clip_dir):
    images = sample_images()
    reference = hpsv2_reference_scores(tiny_clip_dir, images, PROMPTS)
    ours = scorer.score(images, PROMPTS, batch_size=3)
    np.testing.assert_allclose(ours, reference, atol=2e-6)
    assert np.ptp(reference) > 0.05  # the pairs really differ, so agreement is not a constant


def test_preprocessing_matches_hpsv2_image_transform(tiny_clip_dir):
    oc = import_hpsv2_open_clip()
    transform = oc.image_transform(32, is_train=False, resize_longest_max=True)
    for image in sample_images():
        torch.testing.assert_close(hps_pixels(image, 32, oc.OPENAI_DATASET_MEAN, oc.OPENAI_DATASET_STD),
                                   transform(image), atol=1e-6, rtol=0)


def test_preprocessing_resizes_longest_side_and_pads_with_black():
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    wide = Image.new("RGB", (64, 16), (255, 255, 255))  # 4:1 -> 32 x 8 content, 12 + 12 rows of padding
    x = hps_pixels(wide, 32, mean, std)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, :12], torch.full_like(x[:, :12], -1.0))  # black (0) normalised
    assert torch.allclose(x[:, 12:20], torch.ones_like(x[:, 12:20]), atol=1e-4)  # the white image
    assert torch.allclose(x[:, 20:], torch.full_like(x[:, 20:], -1.0))
    # a non-square image whose long side already equals the input size is still padded to a square
    assert hps_pixels(Image.new("RGB", (32, 20)), 32, mean, std).shape == (3, 32, 32)


def test_batched_scores_equal_one_by_one(scorer):
    images = sample_images()
    batched = scorer.score(images, PROMPTS, batch_size=32)
    single = np.concatenate([scorer.score([im], [p], batch_size=1) for im, p in zip(images, PROMPTS)])
    assert batched.dtype == np.float32 and batched.shape == (len(images),)
    np.testing.assert_allclose(batched, single, atol=1e-6)
    assert np.all(np.abs(batched) <= 1.0)


def test_similarity_matrix_diagonal_is_the_score(scorer):
    images = sample_images()[:4]
    matrix = scorer.similarity_matrix(images, PROMPTS[:4])
    assert matrix.shape == (4, 4)
    np.testing.assert_allclose(np.diag(matrix), scorer.score(images, PROMPTS[:4]), atol=1e-6)
    feats = scorer.image_features(images, batch_size=3)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


def test_per_call_path_gives_the_same_scores(scorer, tiny_clip_dir):
    images = sample_images()[:4]
    per_call = PerCallHPS(tiny_clip_dir / CKPT, arch=str(tiny_clip_dir / "tiny-hps-vit.json"))
    ours = scorer.score(images, ["a red circle"] * 4)
    np.testing.assert_allclose(per_call.score(images, "a red circle"), ours, atol=1e-6)


def test_every_ref_kind_loads_the_same_weights(scorer, tiny_clip_dir, tmp_path, monkeypatch):
    images, prompts = sample_images()[:3], PROMPTS[:3]
    expected = scorer.score(images, prompts)
    arch = str(tiny_clip_dir / "tiny-hps-vit.json")
    # an HPS checkpoint file, with the architecture as a config path
    from_file = load_hps_scorer(str(tiny_clip_dir / CKPT), arch=arch)
    # a folder holding only the version's checkpoint file (a download of xswu/HPSv2)
    ckpt_only = tmp_path / "hps_download"
    ckpt_only.mkdir()
    shutil.copy(tiny_clip_dir / CKPT, ckpt_only / CKPT)
    from_ckpt_folder = load_hps_scorer(str(ckpt_only), arch=arch)
    # toy:<name>
    toy_root = tmp_path / "toy_assets"
    shutil.copytree(tiny_clip_dir, toy_root / "hps")
    monkeypatch.setattr("sd_distill.modelref.TOY_ASSETS", toy_root)
    from_toy = load_hps_scorer("toy:hps")
    # the hub id, from a local HF cache (offline)
    cache = tmp_path / "hf_cache"
    snapshot = cache / "models--xswu--HPSv2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_clip_dir / CKPT, snapshot / CKPT)
    (cache / "models--xswu--HPSv2" / "refs").mkdir()
    (cache / "models--xswu--HPSv2" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    from_hub = load_hps_scorer("xswu/HPSv2", arch=arch)
    for loaded in (from_file, from_ckpt_folder, from_toy, from_hub):
        assert loaded.version == "v2.1"
        np.testing.assert_allclose(loaded.score(images, prompts), expected, atol=1e-6)
    assert from_hub.source.endswith(CKPT)


def test_missing_refs_fail_with_what_was_looked_for(tmp_path, tiny_clip_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hps_scorer(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="toy model 'toy:nope' is not shipped"):
        load_hps_scorer("toy:nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"open_clip_config.json.*HPS_v2.1_compressed.pt"):
        load_hps_scorer(str(empty))
    only_v20 = tmp_path / "v20"
    only_v20.mkdir()
    shutil.copy(tiny_clip_dir / CKPT, only_v20 / HPS_FILES["v2.0"])
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):  # never silently the other version
        load_hps_scorer(str(only_v20), version="v2.1")
    assert load_hps_scorer(str(only_v20), version="v2.0", arch=str(tiny_clip_dir / "tiny-hps-vit.json")).version == "v2.0"
    with pytest.raises(FileNotFoundError, match="SD_DISTILL_ALLOW_DOWNLOAD"):
        load_hps_scorer("nobody/no-such-hps-repo")


def test_bad_arguments_fail_early(tiny_clip_dir, scorer, tmp_path):
    other = tmp_path / "tiny-other.json"
    other.write_text(json.dumps(tiny_open_clip_config(embed_dim=16, text_width=16)))
    with pytest.raises(ValueError, match=r"does not fit architecture .*shape mismatches .*text_projection \(32, 32\) vs \(16, 16\)"):
        load_hps_scorer(str(tiny_clip_dir / CKPT), arch=str(other))
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_hps_scorer(str(tiny_clip_dir / CKPT), arch="ViT-Nope")
    with pytest.raises(ValueError, match="not one of"):
        load_hps_scorer(str(tiny_clip_dir), version="v3")
    with pytest.raises(ValueError, match="precision"):
        load_hps_scorer(str(tiny_clip_dir), precision="fp8")
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(sample_images()[:2], ["a"])
    assert scorer.score([], []).shape == (0,)


# bf16 keeps 8 mantissa bits: on the tiny model the scores move by 2.6e-3 at most (measured), under this bound (HPS
# scores of the released checkpoints are ~0.2-0.3, and the filter thresholds differ by far more than this)
BF16_ATOL = 1e-2


def test_bf16_weights_and_worker_preprocessing_match_the_fp32_scores(scorer, tiny_clip_dir):
    images, prompts = sample_images() * 2, PROMPTS * 2
    fp32 = scorer.score(images, prompts, batch_size=5)
    workers = scorer.score(images, prompts, batch_size=5, num_workers=2)
    np.testing.assert_array_equal(workers, fp32)  # same pixels, same model: the same scores
    fast = load_hps_scorer(str(tiny_clip_dir), precision="bf16")
    layers = [m for m in fast.clip.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert {m.weight.dtype for m in layers} == {torch.bfloat16}  # open_clip's "bf16": every matmul in bf16
    bf16 = fast.score(images, prompts, batch_size=16, num_workers=2)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, fp32, atol=BF16_ATOL)
    assert np.corrcoef(bf16, fp32)[0, 1] > 0.99  # the ranking the filter uses survives
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        scorer.score(images, prompts, num_workers=-1)
