"""Load an open_clip model once, from any of the reference kinds the project accepts.

A reference is one of

* a checkpoint file (``HPS_v2.1_compressed.pt``, any ``.pt/.pth/.bin/.safetensors``): a state dict,
  or ``{"state_dict": ...}`` as HPSv2 ships it, loaded with ``torch.load(weights_only=True)`` into the
  architecture ``arch`` (a built-in open_clip name such as ``ViT-H-14``, a name registered with
  ``open_clip.add_model_config``, or the path of an open_clip model-config JSON);
* a folder in the hub layout: ``open_clip_config.json`` ({model_cfg, preprocess_cfg}) +
  ``open_clip_model.safetensors`` (or any weights file open_clip finds there);
* a folder holding one of ``checkpoint_names`` (e.g. a download of ``xswu/HPSv2``);
* ``toy:<name>`` (a shipped toy model folder, via :func:`sd_distill.modelref.resolve_model_ref`);
* a hub repo id: an open_clip repo (config + weights), or a repo holding one of ``checkpoint_names``.
  Downloads only when allowed (``SD_DISTILL_ALLOW_DOWNLOAD=1``); otherwise the local HF cache is used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file

from sd_distill.modelref import allow_download, hub_kwargs, resolve_model_ref

CONFIG_FILE = "open_clip_config.json"
PRECISIONS = ("fp32", "fp16", "bf16", "amp", "amp_bf16")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass
class OpenClipModel:
    """An open_clip CLIP in eval mode with its tokenizer and preprocessing facts."""

    model: torch.nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    preprocess: Callable  # open_clip's own eval transform for this model (shortest-side resize + crop)
    image_size: int
    mean: tuple
    std: tuple
    source: str  # the file or folder the weights came from
    arch: str
    precision: str
    device: torch.device

    def _autocast(self):
        if self.precision.startswith("amp"):
            dtype = torch.bfloat16 if self.precision == "amp_bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return torch.autocast(self.device.type, enabled=False)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings, float32, for a preprocessed batch [B, 3, H, W]."""
        # the dtype of the patch-embedding convolution (open_clip's "bf16" keeps embeddings / norms in fp32)
        visual = getattr(self.model, "visual", self.model)
        dtype = next((m.weight.dtype for m in visual.modules() if isinstance(m, torch.nn.Conv2d)),
                     next(self.model.parameters()).dtype)
        with self._autocast():
            feats = self.model.encode_image(pixels.to(self.device, dtype=dtype, non_blocking=True))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, float32, tokenised with the model's own tokenizer."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self._autocast():
            feats = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def _arch_name(arch: str) -> str:
    """A name open_clip.create_model knows: built-in / registered names pass, JSON paths get registered."""
    import open_clip  # deferred: heavy (open_clip)

    path = Path(arch).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"arch config {arch!r} does not exist")
        cfg = json.loads(path.read_text())
        if "model_cfg" in cfg:  # an open_clip_config.json: use its folder through local-dir
            return f"local-dir:{path.parent}"
        open_clip.add_model_config(path)
        return path.stem
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}: give a built-in or registered name "
                         f"(e.g. 'ViT-H-14', 'ViT-B-32') or the path of an open_clip model-config JSON")
    return arch


def _state_dict_from_file(path: Path) -> dict:
    """The state dict in an HPS-style ``{"state_dict": ...}`` file or a bare state-dict file."""
    if path.suffix == ".safetensors":
        checkpoint = load_file(str(path))
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"{path}: expected a state dict or {{'state_dict': ...}}, got {type(checkpoint).__name__}")
    if all(k.startswith("module.") for k in checkpoint):  # saved from DistributedDataParallel
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def _build(name: str, device: str, precision: str, load_weights: bool):
    import open_clip  # deferred: heavy (open_clip)

    root = logging.getLogger()
    level = root.level
    if not load_weights:  # open_clip warns "initialized randomly"; the caller loads the weights next
        root.setLevel(logging.ERROR)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None, load_weights=load_weights, precision=precision, device=device)
    finally:
        root.setLevel(level)
    return model, preprocess, open_clip.get_tokenizer(name)


def _bundle(model, preprocess, tokenizer, source: str, arch: str, precision: str, device: str) -> OpenClipModel:
    model.eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = tuple(cfg.get("mean") or getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = tuple(cfg.get("std") or getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    return OpenClipModel(model, tokenizer, preprocess, int(size), mean, std, source, arch, precision,
                         torch.device(device))


def load_from_checkpoint_file(path: Path, arch: str, device: str, precision: str) -> OpenClipModel:
    """Build ``arch`` and load the weights in ``path`` strictly (as HPSv2's ``score()`` does)."""
    name = _arch_name(arch)
    model, preprocess, tokenizer = _build(name, "cpu", "fp32", load_weights=False)
    state = _state_dict_from_file(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit architecture {arch!r}: missing keys {missing[:3]}, unexpected "
                         f"keys {unexpected[:3]}, shape mismatches {wrong[:3]}; pass the right `arch`")
    model.load_state_dict(state, strict=True)
    if precision in ("fp16", "bf16"):
        model = model.to(torch.float16 if precision == "fp16" else torch.bfloat16)
    model = model.to(device)
    return _bundle(model, preprocess, tokenizer, str(path), arch, precision, device)


def _load_folder(folder: Path, arch: str, device: str, precision: str, checkpoint_names: Sequence[str]):
    if (folder / CONFIG_FILE).is_file():
        model, preprocess, tokenizer = _build(f"local-dir:{folder}", device, precision, load_weights=True)
        return _bundle(model, preprocess, tokenizer, str(folder), f"local-dir:{folder}", precision, device)
    for name in checkpoint_names:
        if (folder / name).is_file():
            return load_from_checkpoint_file(folder / name, arch, device, precision)
    raise FileNotFoundError(
        f"{folder} holds no open_clip model: looked for {CONFIG_FILE} (+ open_clip_model.safetensors, the hub "
        f"layout) and for the checkpoint files {list(checkpoint_names)}; found {sorted(p.name for p in folder.iterdir())[:10]}")


def _load_hub(repo: str, arch: str, device: str, precision: str, checkpoint_names: Sequence[str]):
    from huggingface_hub import snapshot_download  # deferred: heavy (huggingface_hub)

    patterns = [CONFIG_FILE, "open_clip_model.safetensors", "open_clip_pytorch_model.bin", *checkpoint_names]
    try:
        folder = Path(snapshot_download(repo, allow_patterns=patterns, **hub_kwargs()))
    except Exception as err:  # offline cache miss, unknown repo, no network
        hint = "" if allow_download() else " (downloads are off: set SD_DISTILL_ALLOW_DOWNLOAD=1 to fetch it)"
        raise FileNotFoundError(
            f"model ref {repo!r}: not a local file or folder, not toy:<name>, and the hub repo could not be "
            f"loaded{hint}: {type(err).__name__}: {err}") from err
    return _load_folder(folder, arch, device, precision, checkpoint_names)


def load_open_clip(
    ref: str,
    arch: str = "ViT-H-14",
    device: str = "cpu",
    precision: str = "fp32",
    checkpoint_names: Sequence[str] = (),
) -> OpenClipModel:
    """Load an open_clip model from a checkpoint file, a hub-layout folder, ``toy:<name>`` or a hub id.

    ``arch`` is used only where the weights carry no config (checkpoint files). ``checkpoint_names``
    are file names to look for in folders and hub repos without ``open_clip_config.json``, in order.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    local = resolve_model_ref(ref)  # raises for missing toy:<name> and missing ./ / ~ paths
    path = Path(local).expanduser()
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"{path}: not a checkpoint file (expected one of {CHECKPOINT_SUFFIXES})")
        return load_from_checkpoint_file(path, arch, device, precision)
    if path.is_dir():
        return _load_folder(path, arch, device, precision, checkpoint_names)
    if ref.count("/") != 1 or ref.endswith(CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"model ref {ref!r} is neither an existing file/folder, toy:<name>, nor a hub "
                                f"repo id 'owner/name'")
    return _load_hub(ref, arch, device, precision, checkpoint_names)
