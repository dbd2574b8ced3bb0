"""Image feature extractors for FID / IS, loaded from a reference, and batched feature extraction.

An extractor is any object with ``features(images: Tensor[N, 3, H, W] in [0, 1]) -> (pool [N, D],
logits [N, K])``: the FID InceptionV3 (``metrics.inception``) or a model folder whose ``config.json``
names its class (the toy world's attribute classifier), loaded with ``Class.from_pretrained(folder)``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from sd_distill.modelref import resolve_model_ref
from sd_distill.progress import ProgressFn, report

from .inception import FIDInceptionV3, find_inception_weights

INCEPTION_REF = "inception-v3-fid"
CLASS_KEYS = ("_class_name", "class", "class_name", "architecture")
DEFAULT_MODULES = ("sd_distill.toy.classifier",)


def load_feature_extractor(ref: str, inception_weights: str | None = None, device: str | torch.device = "cpu"):
    """The extractor a reference names.

    ``"inception-v3-fid"``: FIDInceptionV3 from ``inception_weights`` (or $TORCH_HOME/hub/checkpoints);
    a ``.pth`` / ``.pt`` file: FIDInceptionV3 with those weights; a folder or ``toy:<name>`` with a
    ``config.json`` naming a class (``"module.Class"`` inside ``sd_distill``, or a bare class name of
    ``sd_distill.toy.classifier``): ``Class.from_pretrained(folder)``.
    """
    if ref == INCEPTION_REF:
        model = FIDInceptionV3.from_weights(find_inception_weights(inception_weights))
    else:
        path = Path(resolve_model_ref(ref))
        if path.is_file() and path.suffix in (".pth", ".pt"):
            model = FIDInceptionV3.from_weights(path)
        elif path.is_dir():
            model = _load_folder(path)
        else:
            raise FileNotFoundError(f"feature extractor {ref!r}: expected {INCEPTION_REF!r}, an FID Inception .pth "
                                    "file, or a model folder / toy:<name> with a config.json naming its class")
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval()
    return model


def _load_folder(folder: Path):
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"feature extractor folder {folder} has no config.json naming its class")
    config = json.loads(config_path.read_text())
    name = next((config[k] for k in CLASS_KEYS if isinstance(config.get(k), str)), None)
    if name is None:
        raise ValueError(f"{config_path}: no class named under any of {list(CLASS_KEYS)}")
    cls = _resolve_class(name, config_path)
    if not hasattr(cls, "from_pretrained"):
        raise TypeError(f"{config_path}: class {name!r} has no from_pretrained(folder)")
    model = cls.from_pretrained(folder)
    if not hasattr(model, "features"):
        raise TypeError(f"{config_path}: {name!r} has no features(images) -> (pool, logits)")
    return model


def _resolve_class(name: str, config_path: Path):
    """``sd_distill.<...>.Class`` or a bare name in DEFAULT_MODULES; nothing outside the package is imported."""
    if "." in name:
        module, _, attr = name.rpartition(".")
        candidates = [module]
        if not module.startswith("sd_distill."):
            raise ValueError(f"{config_path}: class {name!r} must live in the sd_distill package")
    else:
        candidates, attr = list(DEFAULT_MODULES), name
    for module in candidates:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, attr):
            return getattr(mod, attr)
    raise ValueError(f"{config_path}: class {name!r} not found in {candidates}")


def images_to_tensor(images: Sequence, size: int | None = None) -> torch.Tensor:
    """PIL images -> [N, 3, H, W] float in [0, 1]; ``size`` center-crops to a square and resizes (bicubic)."""
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)[:3]}; pass size= to resize them")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def extract_features(extractor, images: Sequence, batch_size: int = 50, size: int | None = None,
                     progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pool [N, D], logits [N, K]) float64 arrays for PIL images, ``batch_size`` at a time."""
    device = next(extractor.parameters()).device if isinstance(extractor, torch.nn.Module) else torch.device("cpu")
    pools, logits = [], []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start:start + batch_size], size).to(device)
        p, lg = extractor.features(x)
        pools.append(p.double().cpu().numpy())
        logits.append(lg.double().cpu().numpy())
        report(progress, min(start + batch_size, len(images)), len(images), "features")
    return np.concatenate(pools), np.concatenate(logits)
