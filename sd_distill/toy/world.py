"""The toy world: synthetic scenes of colored shapes with compositional captions and known ground truth.

A scene is one or two shapes (circle / square / triangle) in one of six colors on a neutral background,
described by a caption such as ``"a red circle above a blue square"``. Every attribute is kept, so a caption
(original, generated, or recaptioned) and a generated image can be checked against the truth.

Functions:
    ``scene_truth(rng)`` -> a random scene description (dict); ``render_scene(truth, size, rng)`` -> PIL image;
    ``caption_for(truth)`` -> the canonical caption; ``parse_caption(text)`` -> attributes read back from text;
    ``caption_score(caption, truth)`` / ``caption_accuracy(captions, truths)`` -> fraction of attributes right;
    ``make_samples(n, seed, bad_fraction, image_size)`` -> list of samples with planted bad pairs.
The writers for the source formats live in :mod:`sd_distill.toy.sources`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 55, 190),
    "orange": (245, 135, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (238, 238, 238), "gray": (125, 125, 125), "black": (22, 22, 22)}
# relation of object 1 to object 2; the inverse swaps the objects ("a above b" == "b below a")
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
BAD_KINDS: tuple[str, ...] = ("wrong_caption", "boilerplate", "blur", "noise", "blank")
# weak (not bad) captions of good pairs, like real alt-text: they lose or bury attributes; recaptioning fixes them
WEAK_KINDS: tuple[str, ...] = ("partial", "unordered", "decorated")
_DECORATION = ("4k hd wallpaper", "trending on artstation", "high quality stock image", "vector art, flat design")
# every word a toy caption uses (tokenizers get them as single tokens)
WORDS: tuple[str, ...] = ("a", "an", "and", "of", "on", "background", *SHAPES, *COLORS, *BACKGROUNDS, "above", "below", "left", "right")
ATTRIBUTES: tuple[str, ...] = ("n_objects", "color1", "shape1", "relation", "color2", "shape2")
# the web-like mix the toy sources publish and the toy teacher learned from: planted bad pairs, and weak captions
# among the good ones (the miniature of LAION, which SD learned from, uncurated)
WEB_BAD_FRACTION = 0.25
WEB_WEAK_FRACTION = 0.2

_BOILERPLATE = (
    "stock photo image {n}.jpg",
    "IMG_{n}.JPG download free hd wallpaper",
    "click here http://example.com/item/{n} best price",
    "untitled {n} untitled {n} untitled",
    "royalty free vector illustration {n} - shutterstock",
)


def scene_truth(rng: np.random.Generator, two_object_prob: float = 0.7) -> dict:
    """A random scene: ``n_objects``, ``color1/shape1``, and for two objects ``relation``, ``color2/shape2``."""
    two = rng.random() < two_object_prob
    color1, color2 = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    truth = {
        "n_objects": 2 if two else 1,
        "color1": color1,
        "shape1": str(rng.choice(SHAPES)),
        "relation": str(rng.choice(RELATIONS)) if two else None,
        "color2": color2 if two else None,
        "shape2": str(rng.choice(SHAPES)) if two else None,
        "background": str(rng.choice(list(BACKGROUNDS))),
    }
    return truth


def _a(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def caption_for(truth: Mapping) -> str:
    """The canonical caption: ``"a red circle"`` or ``"a red circle above an orange square"``."""
    first = f"{_a(truth['color1'])} {truth['color1']} {truth['shape1']}"
    if truth.get("n_objects", 1) == 1 or not truth.get("relation"):
        return first
    return f"{first} {truth['relation']} {_a(truth['color2'])} {truth['color2']} {truth['shape2']}"


def paraphrase_for(truth: Mapping) -> str:
    """Same scene, other words: the objects swapped with the inverse relation (single objects get the background)."""
    if truth.get("n_objects", 1) == 1 or not truth.get("relation"):
        return f"{_a(truth['color1'])} {truth['color1']} {truth['shape1']} on a {truth['background']} background"
    c1, c2 = truth["color1"], truth["color2"]
    return f"{_a(c2)} {c2} {truth['shape2']} {INVERSE[truth['relation']]} {_a(c1)} {c1} {truth['shape1']}"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def render_scene(truth: Mapping, image_size: int = 32, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw the scene at 4x and downsample (anti-aliased edges); positions and sizes jitter with ``rng``."""
    if not 16 <= image_size <= 256:
        raise ValueError(f"image_size must be in [16, 256], got {image_size}")
    rng = rng if rng is not None else np.random.default_rng(0)
    big = image_size * 4
    img = Image.new("RGB", (big, big), BACKGROUNDS[truth["background"]])
    draw = ImageDraw.Draw(img)
    jitter = lambda: (rng.random() - 0.5) * 0.12 * big  # noqa: E731 - small position noise
    if truth["n_objects"] == 1 or not truth.get("relation"):
        r = big * (0.22 + 0.08 * rng.random())
        _draw_shape(draw, truth["shape1"], big / 2 + jitter(), big / 2 + jitter(), r, COLORS[truth["color1"]])
        return img.resize((image_size, image_size), Image.LANCZOS)
    # object 1 sits on the side its relation names; object 2 on the opposite side
    near, far = 0.27 * big, 0.73 * big
    first, second = {
        "above": ((big / 2, near), (big / 2, far)),
        "below": ((big / 2, far), (big / 2, near)),
        "left of": ((near, big / 2), (far, big / 2)),
        "right of": ((far, big / 2), (near, big / 2)),
    }[truth["relation"]]
    for (cx, cy), shape, color in ((first, truth["shape1"], truth["color1"]), (second, truth["shape2"], truth["color2"])):
        r = big * (0.15 + 0.05 * rng.random())
        _draw_shape(draw, shape, cx + jitter(), cy + jitter(), r, COLORS[color])
    return img.resize((image_size, image_size), Image.LANCZOS)


def degrade_image(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A bad image of the given kind: heavy blur, heavy noise, or a blank (flat color) frame."""
    size = img.size[0]
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=size / 6))
    if kind == "noise":
        arr = np.asarray(img, dtype=np.float32)
        arr = 0.35 * arr + 0.65 * rng.uniform(0, 255, size=arr.shape)
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if kind == "blank":
        return Image.new("RGB", img.size, tuple(int(v) for v in rng.integers(0, 256, size=3)))
    raise ValueError(f"unknown image degradation {kind!r}; valid: blur, noise, blank")


def boilerplate_caption(rng: np.random.Generator) -> str:
    return _BOILERPLATE[int(rng.integers(len(_BOILERPLATE)))].format(n=int(rng.integers(1000, 9999)))


@dataclass
class Sample:
    """One image-text pair of the toy world; ``caption`` is what the sources publish (maybe wrong)."""

    key: str
    image: Image.Image
    caption: str
    truth: dict
    true_caption: str
    is_bad: bool = False
    bad_kind: str | None = None
    extra_captions: list[str] = field(default_factory=list)  # more captions for the same image (COCO has five)
    caption_kind: str = "true"  # "true", a WEAK_KINDS entry, or the bad kind for bad pairs

    def truth_row(self) -> dict:
        return {
            "key": self.key,
            **{a: self.truth[a] for a in (*ATTRIBUTES, "background")},
            "caption": self.caption,
            "true_caption": self.true_caption,
            "is_bad": self.is_bad,
            "bad_kind": self.bad_kind,
            "caption_kind": self.caption_kind,
        }


def weak_caption(truth: Mapping, kind: str, rng: np.random.Generator) -> str:
    """A weak caption of a correct pair: ``partial`` names one object of two (one-object scenes: the color
    only), ``unordered`` names both objects without their relation (one-object scenes: the shape only),
    ``decorated`` appends alt-text junk to the true caption (no attribute lost)."""
    c1, s1 = truth["color1"], truth["shape1"]
    two = truth.get("n_objects") == 2
    if kind == "partial":
        if not two:
            return f"{_a(c1)} {c1} shape on a {truth['background']} background"
        color, shape = (c1, s1) if rng.random() < 0.5 else (truth["color2"], truth["shape2"])
        return f"{_a(color)} {color} {shape}"
    if kind == "unordered":
        if not two:
            return f"a {s1} on a {truth['background']} background"
        return f"{_a(c1)} {c1} {s1} and {_a(truth['color2'])} {truth['color2']} {truth['shape2']}"
    if kind == "decorated":
        return f"{caption_for(truth)}, {_DECORATION[int(rng.integers(len(_DECORATION)))]}"
    raise ValueError(f"unknown weak caption kind {kind!r}; valid: {WEAK_KINDS}")


def make_samples(n: int, seed: int = 0, bad_fraction: float = WEB_BAD_FRACTION, image_size: int = 32, prefix: str = "toy",
                 weak_fraction: float = WEB_WEAK_FRACTION) -> list[Sample]:
    """``n`` samples, exactly ``round(n * bad_fraction)`` of them bad, bad kinds in turn over :data:`BAD_KINDS`.

    Deterministic in ``seed``. A wrong caption describes another random scene with a different caption.
    Of the good pairs, ``round(n_good * weak_fraction)`` get a weak caption (kinds in turn over
    :data:`WEAK_KINDS`); they stay ``is_bad=False``. Weak captions come from a separate random stream, so
    images and truths do not depend on ``weak_fraction``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= bad_fraction <= 1.0:
        raise ValueError(f"bad_fraction must be in [0, 1], got {bad_fraction}")
    if not 0.0 <= weak_fraction <= 1.0:
        raise ValueError(f"weak_fraction must be in [0, 1], got {weak_fraction}")
    rng = np.random.default_rng(seed)
    n_bad = int(round(n * bad_fraction))
    bad_index = {int(i): BAD_KINDS[j % len(BAD_KINDS)] for j, i in enumerate(sorted(rng.permutation(n)[:n_bad]))}
    samples = []
    for i in range(n):
        truth = scene_truth(rng)
        true_caption = caption_for(truth)
        image = render_scene(truth, image_size, rng)
        kind = bad_index.get(i)
        caption = true_caption
        extra = [paraphrase_for(truth)]
        if kind == "wrong_caption":
            other = scene_truth(rng)
            while caption_for(other) == true_caption:
                other = scene_truth(rng)
            caption, extra = caption_for(other), []
        elif kind == "boilerplate":
            caption, extra = boilerplate_caption(rng), []
        elif kind is not None:
            image = degrade_image(image, kind, rng)
        samples.append(Sample(f"{prefix}{i:06d}", image, caption, truth, true_caption, kind is not None, kind, extra,
                              caption_kind=kind or "true"))
    weak_rng = np.random.default_rng([seed, 7])
    good = [i for i in range(n) if i not in bad_index]
    n_weak = int(round(len(good) * weak_fraction))
    for j, i in enumerate(sorted(weak_rng.permutation(good)[:n_weak].tolist()) if good else []):
        s = samples[i]
        s.caption_kind = WEAK_KINDS[j % len(WEAK_KINDS)]
        s.caption = weak_caption(s.truth, s.caption_kind, weak_rng)
    return samples


# ---------------------------------------------------------------- parsing captions back into attributes

_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(sorted(SHAPES, key=len, reverse=True))
_OBJECT = re.compile(rf"\b({_COLOR_RE})\s+({_SHAPE_RE})s?\b")
_RELATION = re.compile(r"\b(above|below|under|over|on top of|beneath|(?:to the )?left of|(?:to the )?right of)\b")
_REL_NORMAL = {"over": "above", "on top of": "above", "under": "below", "beneath": "below"}
_BG = re.compile(rf"\bon an? ({'|'.join(BACKGROUNDS)}) background\b")


def parse_caption(text: str) -> dict:
    """Attributes read back from a caption, in canonical form (relation ``above`` / ``left of``; objects swapped).

    Returns ``{n_objects, color1, shape1, relation, color2, shape2, background}``; anything not found is None
    (``n_objects`` is 0 when no colored shape is named).
    """
    text = (text or "").lower()
    objects = [(m.group(1), m.group(2), m.start(), m.end()) for m in _OBJECT.finditer(text)][:2]
    out: dict = {a: None for a in ATTRIBUTES}
    out["n_objects"] = len(objects)
    bg = _BG.search(text)
    out["background"] = bg.group(1) if bg else None
    if objects:
        out["color1"], out["shape1"] = objects[0][:2]
    if len(objects) == 2:
        out["color2"], out["shape2"] = objects[1][:2]
        between = _RELATION.search(text, objects[0][3], objects[1][2])
        if between:
            rel = between.group(1).replace("to the ", "")
            out["relation"] = _REL_NORMAL.get(rel, rel)
    return canonical(out)


def canonical(attrs: Mapping) -> dict:
    """Swap the objects of a ``below`` / ``right of`` description so equal scenes compare equal."""
    out = dict(attrs)
    if out.get("relation") in ("below", "right of"):
        out["relation"] = INVERSE[out["relation"]]
        out["color1"], out["color2"] = out["color2"], out["color1"]
        out["shape1"], out["shape2"] = out["shape2"], out["shape1"]
    return out


def _slots(truth: Mapping) -> tuple[str, ...]:
    return ATTRIBUTES if truth.get("n_objects") == 2 else ("n_objects", "color1", "shape1")


def caption_score(caption: str, truth: Mapping | str) -> float:
    """Fraction of the truth's attributes (object count, colors, shapes, relation) that the caption states right.

    ``truth`` is a truth row / scene dict or a correct caption (parsed). A single-object scene has three
    attributes (count, color, shape); a two-object scene six.
    """
    want = parse_caption(truth) if isinstance(truth, str) else canonical({a: truth.get(a) for a in ATTRIBUTES})
    if not want.get("n_objects"):
        raise ValueError(f"truth names no object: {truth!r}")
    got = parse_caption(caption)
    slots = _slots(want)
    return sum(got[a] == want[a] for a in slots) / len(slots)


def caption_accuracy(captions: Sequence[str], truths: Iterable[Mapping | str]) -> float:
    """Mean :func:`caption_score` over pairs (``truths``: dicts, truth-table rows, or true captions)."""
    truths = list(truths.to_dict("records") if hasattr(truths, "to_dict") else truths)
    captions = list(captions)
    if len(captions) != len(truths):
        raise ValueError(f"{len(captions)} captions but {len(truths)} truths")
    if not captions:
        raise ValueError("caption_accuracy of an empty list")
    return float(np.mean([caption_score(c, t) for c, t in zip(captions, truths)]))

