"""The toy world's attribute classifier: reads a scene's objects back from pixels; also the toy "Inception".

A small CNN (three conv stages, a 4x4 average pool kept spatial so positions survive, one linear layer
-> ``pool`` features) with one linear head per
attribute of the canonical scene description (:func:`sd_distill.toy.world.canonical`: two objects are
ordered top-then-bottom or left-then-right):

    n_objects (1, 2) | color1 (6) | shape1 (3) | relation (none, above, left of) | color2 (none + 6) | shape2 (none + 3)

``features(images)`` returns ``(pool [N, D], logits [N, 18])`` where the logits are over the 18
(color, shape) classes of the first object, one softmax, so FID uses ``pool`` and the Inception Score
uses ``logits`` as with InceptionV3. ``attribute_accuracy(images, truths_or_prompts)`` scores generated
images against their prompts. Saved as ``config.json`` (with ``_class_name``) + ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sd_distill.modelref import resolve_model_ref
from sd_distill.toy.world import COLORS, SHAPES, canonical, parse_caption

HEADS: dict[str, tuple] = {
    "n_objects": (1, 2),
    "color1": tuple(COLORS),
    "shape1": SHAPES,
    "relation": (None, "above", "left of"),
    "color2": (None, *COLORS),
    "shape2": (None, *SHAPES),
}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def targets_for(truth: Mapping) -> dict[str, int]:
    """Class index per head for one scene (canonical form)."""
    t = canonical({k: truth.get(k) for k in HEADS})
    return {head: HEADS[head].index(t[head] if head != "n_objects" else int(t[head])) for head in HEADS}


class ToyAttributeClassifier(nn.Module):
    """CNN over [N, 3, S, S] images in [0, 1] (resized to ``image_size``); heads per attribute."""

    def __init__(self, image_size: int = 32, widths: Sequence[int] = (16, 32, 64), feature_dim: int = 128):
        super().__init__()
        self.config = {"_class_name": type(self).__name__, "image_size": image_size, "widths": list(widths),
                       "feature_dim": feature_dim}
        layers, c_in = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            if i < len(widths) - 1:
                layers.append(nn.AvgPool2d(2))
            c_in = w
        # a global average would forget where things are (above / left of); a 4x4 grid keeps it
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c_in * 16, feature_dim), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(classes)) for name, classes in HEADS.items()})
        self.primary = nn.Linear(feature_dim, len(COLORS) * len(SHAPES))  # (color1, shape1) jointly: the IS classes

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    def _pool(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        size = self.config["image_size"]
        x = images.float()
        if x.shape[-2:] != (size, size):
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head (and ``primary``: the 18 first-object classes)."""
        pool = self._pool(images)
        out = {name: head(pool) for name, head in self.heads.items()}
        out["primary"] = self.primary(pool)
        return out

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool [N, D] for FID, logits [N, 18] over first-object (color, shape) classes for IS)."""
        pool = self._pool(images)
        return pool, self.primary(pool)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict]:
        """The canonical scene description read from each image."""
        out = self.forward(images)
        idx = {name: out[name].argmax(-1).tolist() for name in HEADS}
        return [{name: HEADS[name][idx[name][i]] for name in HEADS} for i in range(len(images))]

    def attribute_accuracy(self, images, truths_or_prompts: Iterable[Mapping | str]) -> float:
        """Mean fraction of each scene's attributes read back right (3 for one object, 6 for two).

        ``images``: a [N, 3, H, W] tensor in [0, 1] or PIL images; ``truths_or_prompts``: truth dicts or
        prompts (parsed with :func:`parse_caption`). The predicted object count is always scored; the
        second object's attributes only where the truth has two.
        """
        return float(np.mean(self.attribute_scores(images, truths_or_prompts)))

    @torch.no_grad()
    def attribute_scores(self, images, truths_or_prompts: Iterable[Mapping | str]) -> np.ndarray:
        """Per image: the fraction of its scene's attributes read back right (``attribute_accuracy``'s terms), [N]."""
        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0).permute(0, 3, 1, 2)
        truths = [parse_caption(t) if isinstance(t, str) else canonical(dict(t)) for t in truths_or_prompts]
        if len(truths) != len(images):
            raise ValueError(f"{len(images)} images but {len(truths)} truths/prompts")
        scores = []
        for start in range(0, len(images), 256):
            for pred, want in zip(self.predict(images[start:start + 256]), truths[start:start + 256]):
                if not want.get("n_objects"):
                    raise ValueError(f"prompt/truth names no toy object: {want}")
                slots = list(HEADS) if want["n_objects"] == 2 else ["n_objects", "color1", "shape1"]
                scores.append(np.mean([pred[s] == want[s] for s in slots]))
        return np.asarray(scores, dtype=np.float64)

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config, indent=1))
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ToyAttributeClassifier":
        folder = Path(resolve_model_ref(str(folder)))
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not a toy classifier folder: {name} is missing")
        config = json.loads((folder / CONFIG_FILE).read_text())
        if config.get("_class_name") != cls.__name__:
            raise ValueError(f"{folder / CONFIG_FILE}: _class_name is {config.get('_class_name')!r}, expected {cls.__name__!r}")
        model = cls(image_size=config["image_size"], widths=config["widths"], feature_dim=config["feature_dim"])
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return model.eval()
