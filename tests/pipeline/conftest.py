"""Fixtures of the training and scoring tests (their builders live in `train_support`)."""

from __future__ import annotations

import pytest

from train_support import build_synth, build_tiny


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A synthetic teacher with train / eval caches and a small in-memory source."""
    return build_synth(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir, corpus_dir, tmp_path_factory):
    """The tiny random Llama, its train split and a cache of its first sequences."""
    return build_tiny(tiny_model_dir, corpus_dir, tmp_path_factory.mktemp("tiny-cache"))
