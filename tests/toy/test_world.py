"""The toy world's scenes, captions, parser and planted bad pairs."""

import numpy as np
import pytest

from sd_distill.toy.world import (
    BAD_KINDS,
    WEAK_KINDS,
    caption_accuracy,
    caption_for,
    caption_score,
    make_samples,
    paraphrase_for,
    parse_caption,
    render_scene,
    scene_truth,
)

TWO = {"n_objects": 2, "color1": "red", "shape1": "circle", "relation": "above", "color2": "blue", "shape2": "square", "background": "white"}
ONE = {"n_objects": 1, "color1": "orange", "shape1": "triangle", "relation": None, "color2": None, "shape2": None, "background": "black"}


def test_caption_for_is_compositional_with_articles():
    assert caption_for(TWO) == "a red circle above a blue square"
    assert caption_for(ONE) == "an orange triangle"


def test_parse_caption_round_trips_every_generated_scene():
    rng = np.random.default_rng(0)
    for _ in range(200):
        t = scene_truth(rng)
        assert caption_score(caption_for(t), t) == 1.0
        assert caption_score(paraphrase_for(t), t) == 1.0


def test_parse_caption_canonicalizes_inverse_relations_and_synonyms():
    a = parse_caption("a blue square below a red circle")
    b = parse_caption("A red circle on top of a blue square.")
    assert a == b
    assert a["relation"] == "above" and a["color1"] == "red" and a["shape2"] == "square"
    assert parse_caption("a green square to the right of a yellow circle")["relation"] == "left of"


def test_parse_caption_of_boilerplate_finds_nothing():
    p = parse_caption("stock photo image 1234.jpg")
    assert p["n_objects"] == 0 and p["color1"] is None


def test_caption_score_counts_attributes():
    assert caption_score("a red circle above a green square", TWO) == pytest.approx(5 / 6)
    assert caption_score("a red circle", TWO) == pytest.approx(2 / 6)  # color1, shape1 right; count wrong
    assert caption_score("nothing here", ONE) == 0.0
    assert caption_score("an orange triangle", "an orange triangle") == 1.0


def test_caption_accuracy_averages_and_rejects_length_mismatch():
    assert caption_accuracy(["a red circle above a blue square", "junk"], [TWO, ONE]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 captions but 1 truths"):
        caption_accuracy(["a", "b"], [TWO])


def test_render_scene_places_objects_by_relation():
    img = np.asarray(render_scene(TWO, 32, np.random.default_rng(0))).astype(int)
    red = (np.abs(img - [220, 40, 40]).sum(-1) < 60)
    blue = (np.abs(img - [40, 80, 225]).sum(-1) < 60)
    assert red.sum() > 10 and blue.sum() > 10
    assert np.argwhere(red)[:, 0].mean() < np.argwhere(blue)[:, 0].mean()  # red is above (smaller row)


def test_make_samples_is_deterministic_and_plants_the_requested_bad_fraction():
    a = make_samples(40, seed=5, bad_fraction=0.25)
    b = make_samples(40, seed=5, bad_fraction=0.25)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    bad = [s for s in a if s.is_bad]
    assert len(bad) == 10
    assert {s.bad_kind for s in bad} == set(BAD_KINDS)
    for s in a:
        if s.bad_kind in ("wrong_caption", "boilerplate") or s.caption_kind in WEAK_KINDS:
            assert s.caption != s.true_caption
        else:
            assert s.caption == s.true_caption and s.caption_kind in ("true", "blur", "noise", "blank")
    blank = next(s for s in bad if s.bad_kind == "blank")
    assert np.asarray(blank.image).reshape(-1, 3).std(0).max() == 0


def test_make_samples_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bad_fraction"):
        make_samples(10, bad_fraction=1.5)
    with pytest.raises(ValueError, match="n must be"):
        make_samples(0)


def test_weak_captions_lose_attributes_but_keep_the_pair_good():
    a = make_samples(60, seed=2, bad_fraction=0.25, weak_fraction=0.2)
    weak = [s for s in a if s.caption_kind in WEAK_KINDS]
    assert len(weak) == 9 and not any(s.is_bad for s in weak)
    assert {s.caption_kind for s in weak} == set(WEAK_KINDS)
    for s in weak:
        score = caption_score(s.caption, s.truth)
        assert score == 1.0 if s.caption_kind == "decorated" else score < 1.0
    none = make_samples(60, seed=2, bad_fraction=0.25, weak_fraction=0.0)
    assert all(x.caption_kind in ("true", *BAD_KINDS) for x in none)
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, none))  # images unchanged
