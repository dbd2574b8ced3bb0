"""Shared toy-world fixtures (import the ones a test module needs: ``from tests._fixtures_toy import toy_sources``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def toy_sources(tmp_path_factory):
    """A 40-sample toy source set (every format) and its paths, written once per session."""
    from sd_distill.toy.sources import make_toy_sources

    out = tmp_path_factory.mktemp("toy_sources")
    return make_toy_sources(out, n=40, seed=0, bad_fraction=0.25)


@pytest.fixture(scope="session")
def toy_served(toy_sources):
    """``(base_url, paths)``: the toy source folder served on loopback for the whole session."""
    from sd_distill.toy.server import serve_folder

    with serve_folder(toy_sources["truth"].parent) as base_url:
        yield base_url, toy_sources


@pytest.fixture(scope="session")
def toy_classifier():
    from sd_distill.toy.classifier import ToyAttributeClassifier

    return ToyAttributeClassifier.from_pretrained("toy:classifier")
