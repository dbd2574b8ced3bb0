"""Caption cleaning and the choice between an original and a generated caption.

:func:`clean_caption` applies, in order, and records the name of every rule that changed the text:

1. ``decoded_bytes``: bytes are decoded as UTF-8, invalid sequences dropped;
2. ``html_entities``: ``&amp;`` / ``&#39;`` ... unescaped, ``<b>``-style tags removed;
3. ``unicode_nfkc``: Unicode NFKC normalisation, control and zero-width characters removed;
4. ``urls``, ``file_names``, ``stock_photo``: URLs / e-mail addresses, file names with an image or
   document extension, and stock-photo boilerplate ("stock photo", "royalty free", "getty images" ...);
5. ``boilerplate_prefix``: a leading "image of", "a photo of", "picture showing", "close-up photo of" ...;
6. ``repeats``: a word or phrase (up to 6 words) repeated back to back collapses to one copy;
7. ``whitespace``: runs of whitespace collapse, stray separators at the ends go;
8. ``truncated``: more than ``max_words`` words keeps the first ``max_words``.

A caption is ``usable`` when at least one word with a letter survives.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Optional, Union

_URL = re.compile(r"(?:https?://|ftp://|www\.)\S+|\b[\w.+-]+@[\w-]+\.[\w.]+\b|\b[\w-]+\.(?:com|net|org|io)(?:/\S*)?\b",
                  re.IGNORECASE)
_FILE = re.compile(r"\b[\w()\[\]~-]+(?:\.[\w-]+)*\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|svg|pdf|eps|psd|ai|raw|mp4)\b",
                   re.IGNORECASE)
_STOCK = re.compile(
    r"\b(?:royalty[- ]free|stock (?:photo(?:graphy)?|image|picture|footage|illustration|vector)s?|"
    r"(?:shutterstock|getty ?images|istock(?:photo)?|alamy|dreamstime|depositphotos|123rf|adobe stock)"
    r"(?: (?:photo|image|id))?|high[- ]resolution|hi[- ]res|free download|download free|"
    r"editorial use only|all rights reserved|copyright ©?\s*\d{0,4}|©\s*\d{0,4}|\bid:?\s*\d{5,})\b\.?",
    re.IGNORECASE)
_PREFIX = re.compile(
    r"^(?:(?:an?|the|this|there is an?)\s+)?(?:(?:close[- ]up|high[- ]quality|stock|color|colour|digital|"
    r"black and white)\s+)?(?:image|photo(?:graph)?|picture|pic|illustration|rendering|render|"
    r"snapshot|shot|view)\s+(?:of|showing|shows|depicting|with|that shows)\s+", re.IGNORECASE)
_HTML_TAG = re.compile(r"</?[a-zA-Z][^<>]{0,40}>")
_INVISIBLE = re.compile(r"[\u200b-\u200f\u2028\u2029\u2060\ufeff]")


@dataclass
class CleanedCaption:
    text: str
    changes: list[str] = field(default_factory=list)  # names of the rules that changed the text, in order
    usable: bool = True
    reason: Optional[str] = None  # why it is not usable


def _collapse_repeats(text: str) -> str:
    """Collapse back-to-back repeats of a 1-6 word phrase ("red red red" -> "red", "a b a b" -> "a b")."""
    words = text.split()
    keys = [w.lower().strip(",.;:!?") for w in words]
    count, i = len(words), 0
    while i < len(words):
        for n in (6, 5, 4, 3, 2, 1):
            span = keys[i:i + n]
            if len(span) == n and any(ch.isalpha() for k in span for ch in k) and keys[i + n:i + 2 * n] == span:
                del words[i + n:i + 2 * n], keys[i + n:i + 2 * n]  # drop the second copy, look again at i
                break
        else:
            i += 1
    return text if len(words) == count else " ".join(words)


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:|/\-–—])(\s*[,;:|/\-–—])+", r"\1", text)  # separators left behind by removals
    text = re.sub(r"\(\s*\)|\[\s*\]", "", text)
    return text.strip(" \t,;:|/-–—_").strip()


def clean_caption(text: Union[str, bytes, None], max_words: int = 77) -> CleanedCaption:
    """Clean one caption (rules 1-8 in the module docstring) and say whether anything usable is left."""
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    changes: list[str] = []

    def apply(name: str, new: str) -> None:
        nonlocal text
        if new != text:
            changes.append(name)
            text = new

    if text is None:
        return CleanedCaption("", [], False, "empty")
    if isinstance(text, (bytes, bytearray)):
        decoded = bytes(text).decode("utf-8", errors="ignore")
        if decoded.encode("utf-8") != bytes(text):
            changes.append("decoded_bytes")
        text = decoded
    else:
        apply("decoded_bytes", text.encode("utf-8", errors="ignore").decode("utf-8"))  # lone surrogates
    apply("html_entities", _HTML_TAG.sub(" ", html.unescape(html.unescape(text))))
    nfkc = unicodedata.normalize("NFKC", text)
    nfkc = "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in nfkc)
    apply("unicode_nfkc", _INVISIBLE.sub("", nfkc))
    apply("urls", _URL.sub(" ", text))
    apply("file_names", _FILE.sub(" ", text))
    apply("stock_photo", _STOCK.sub(" ", text))
    stripped = re.sub(r"\s+", " ", text).strip(" \t,;:|-")
    prefixed = _PREFIX.sub("", stripped, count=1)
    if prefixed != stripped:
        apply("boilerplate_prefix", prefixed)
    apply("repeats", _collapse_repeats(text))
    apply("whitespace", _tidy(text))
    words = text.split(" ")
    if len(words) > max_words:
        apply("truncated", " ".join(words[:max_words]))
    if not any(ch.isalpha() for ch in text):
        return CleanedCaption(text, changes, False, "empty" if not text else "no words left")
    return CleanedCaption(text, changes, True, None)


def choose_caption(
    original: str,
    generated: str,
    sim_original: Optional[float],
    sim_generated: Optional[float],
    margin: float = 0.0,
) -> tuple[str, str, str]:
    """Keep the caption the image agrees with more: ``(caption, source, reason)``.

    ``sim_*`` are image-text similarities from the same scorer (HPS or CLIP cosine). The generated
    caption replaces the original only when it is usable and beats it by more than ``margin``; an
    unusable original (empty, boilerplate only) gives way to any usable generated caption.
    ``source`` is ``"original"`` or ``"generated"``.
    """
    orig_ok = bool(original and original.strip())
    gen_ok = bool(generated and generated.strip())
    if not gen_ok:
        return original, "original", "generated caption empty"
    if not orig_ok:
        return generated, "generated", "original caption empty"
    if sim_original is None or sim_generated is None:
        raise ValueError("choose_caption needs both similarities when both captions are non-empty")
    if sim_generated > sim_original + margin:
        return generated, "generated", f"similarity {sim_generated:.4f} > {sim_original:.4f} + margin {margin:g}"
    return original, "original", f"similarity {sim_original:.4f} >= {sim_generated:.4f} - margin {margin:g}"
