"""Caption cleaning and the original-vs-generated choice, table-driven."""

from __future__ import annotations

import pytest

from sd_distill.captioning.clean import choose_caption, clean_caption

CASES = [
    # (input, cleaned text, rules that fired, usable)
    ("a red circle above a blue square", "a red circle above a blue square", [], True),
    ("  a red\tcircle \n above  a square ", "a red circle above a square", ["unicode_nfkc", "whitespace"], True),
    ("Stock Photo - a red circle", "a red circle", ["stock_photo", "whitespace"], True),
    ("a red circle | Shutterstock", "a red circle", ["stock_photo", "whitespace"], True),
    ("a red circle royalty free stock image", "a red circle", ["stock_photo", "whitespace"], True),
    ("Image of a cat", "a cat", ["boilerplate_prefix"], True),
    ("A close-up photo of a dog", "a dog", ["boilerplate_prefix"], True),
    ("Picture showing two birds", "two birds", ["boilerplate_prefix"], True),
    ("a cat https://example.com/cat?id=3 sleeping", "a cat sleeping", ["urls", "whitespace"], True),
    ("a cat www.cats.org on a sofa", "a cat on a sofa", ["urls", "whitespace"], True),
    ("a cat, IMG_2034.JPG", "a cat", ["file_names", "whitespace"], True),
    ("red red red circle", "red circle", ["repeats"], True),
    ("a cat on a mat a cat on a mat", "a cat on a mat", ["repeats"], True),
    ("Tom &amp; Jerry &#39;cartoon&#39;", "Tom & Jerry 'cartoon'", ["html_entities"], True),
    ("<b>bold</b> cat", "bold cat", ["html_entities", "whitespace"], True),
    ("ＲＥＤ\u3000circle\u200b", "RED circle", ["unicode_nfkc"], True),
    (b"caf\xc3\xa9 \xff\xferouge", "café rouge", ["decoded_bytes"], True),
    ("caf\udce9 noir", "caf noir", ["decoded_bytes"], True),
    ("IMG_2034.JPG", "", ["file_names", "whitespace"], False),
    ("royalty free stock photo", "", ["stock_photo", "whitespace"], False),
    ("https://example.com/a.jpg", "", ["urls", "whitespace"], False),
    ("   ", "", ["whitespace"], False),
    ("12345 !!!", "12345!!!", ["whitespace"], False),
    (None, "", [], False),
]


@pytest.mark.parametrize("raw, text, changes, usable", CASES)
def test_clean_caption_table(raw, text, changes, usable):
    cleaned = clean_caption(raw)
    assert (cleaned.text, cleaned.changes, cleaned.usable) == (text, changes, usable)
    assert (cleaned.reason is None) == usable


def test_long_captions_are_truncated_to_max_words():
    cleaned = clean_caption(" ".join(f"w{i}" for i in range(100)), max_words=77)
    assert cleaned.text.split() == [f"w{i}" for i in range(77)] and cleaned.changes == ["truncated"]
    with pytest.raises(ValueError, match="max_words"):
        clean_caption("a", max_words=0)


CHOICES = [
    # (original, generated, sim_original, sim_generated, margin, expected source, reason fragment)
    ("a cat", "a red circle", 0.20, 0.30, 0.0, "generated", "0.3000 > 0.2000"),
    ("a cat", "a red circle", 0.30, 0.20, 0.0, "original", "0.3000 >= 0.2000"),
    ("a cat", "a red circle", 0.25, 0.27, 0.05, "original", "margin 0.05"),
    ("a cat", "a red circle", 0.25, 0.25, 0.0, "original", ">="),  # ties keep the original
    ("", "a red circle", None, 0.1, 0.0, "generated", "original caption empty"),
    ("a cat", "  ", 0.1, None, 0.0, "original", "generated caption empty"),
]


@pytest.mark.parametrize("original, generated, s_o, s_g, margin, source, reason", CHOICES)
def test_choose_caption_table(original, generated, s_o, s_g, margin, source, reason):
    caption, got_source, got_reason = choose_caption(original, generated, s_o, s_g, margin)
    assert got_source == source
    assert caption == (generated if source == "generated" else original)
    assert reason in got_reason


def test_choose_caption_needs_both_similarities():
    with pytest.raises(ValueError, match="both similarities"):
        choose_caption("a cat", "a dog", None, 0.2)
