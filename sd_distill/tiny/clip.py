"""Tiny open_clip models in the real CLIP architecture, saved in the layouts real checkpoints use.

Two layouts, both read by :func:`sd_distill.scoring.openclip.load_open_clip`:

* the hub folder layout: ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``)
  next to ``open_clip_model.safetensors``;
* an HPSv2-style checkpoint file: ``torch.save({"state_dict": model.state_dict()})``, the format of
  ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (the HPSv2 repository's ``score()`` reads
  ``checkpoint["state_dict"]``). A checkpoint file carries no architecture, so the config is also
  written as ``<name>.json`` (an open_clip model config) and registered with
  ``open_clip.add_model_config`` so ``open_clip.create_model(<name>)`` knows it.

The text tower keeps CLIP's real vocabulary (49,408 BPE tokens, context 77), so open_clip's own
tokenizer, which ships its BPE vocab, works unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def tiny_open_clip_config(
    embed_dim: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    vision_width: int = 32,
    vision_layers: int = 2,
    text_width: int = 32,
    text_heads: int = 2,
    text_layers: int = 2,
    context_length: int = 77,
    vocab_size: int = 49408,
) -> dict:
    """An open_clip model config (the schema of ``open_clip/model_configs/ViT-H-14.json``) at toy size."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": vision_layers,
            "width": vision_width,
            "head_width": vision_width // 2,  # two heads, like ViT-H-14's width / head_width = 16 heads
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": text_width,
            "heads": text_heads,
            "layers": text_layers,
        },
    }


def register_open_clip_config(name: str, model_cfg: dict, folder: Path) -> Path:
    """Write ``<folder>/<name>.json`` and register it, so ``open_clip.create_model(name)`` builds it."""
    import open_clip  # deferred: heavy (open_clip)

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(model_cfg, indent=2))
    open_clip.add_model_config(path)
    return path


def save_open_clip_folder(model: torch.nn.Module, model_cfg: dict, folder: Path, image_size: int) -> Path:
    """Save ``model`` in the hub layout: open_clip_config.json + open_clip_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = {"size": image_size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    return folder


def save_hps_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """Save ``{"state_dict": ...}`` like HPSv2's released ``HPS_v2*_compressed.pt`` files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)
    return path


def build_tiny_open_clip(
    folder: Path | str,
    name: str = "tiny-hps-vit",
    seed: int = 0,
    hps_checkpoint: Optional[str] = "HPS_v2.1_compressed.pt",
    **config_overrides,
) -> Path:
    """Build a random tiny open_clip CLIP and save it in ``folder`` in the hub layout.

    Also writes ``<name>.json`` (the model config, registered with ``open_clip.add_model_config``) and,
    unless ``hps_checkpoint`` is None, an HPS-style checkpoint file of the same weights under that file
    name. Returns ``folder``. ``config_overrides`` go to :func:`tiny_open_clip_config`.
    """
    import open_clip  # deferred: heavy (open_clip)

    folder = Path(folder)
    model_cfg = tiny_open_clip_config(**config_overrides)
    register_open_clip_config(name, model_cfg, folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    save_open_clip_folder(model, model_cfg, folder, model_cfg["vision_cfg"]["image_size"])
    if hps_checkpoint:
        save_hps_checkpoint(model, folder / hps_checkpoint)
    return folder
