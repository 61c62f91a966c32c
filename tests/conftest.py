"""Shared fixtures: a tiny random BERT saved like a hub model (no download), and its model/tokenizer."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return model.make_tiny_bert(str(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture
def tiny(tiny_dir):
    """(tagger with adapter, tokenizer), dropout off so that runs are comparable."""
    tagger, tokenizer, _ = model.load_tagger(tiny_dir, data.LABELS, adapter_dim=8)
    tagger.eval()
    return tagger, tokenizer


@pytest.fixture(scope="session")
def tiny_nodrop_dir(tmp_path_factory):
    """The tiny BERT without dropout: script runs (train mode) can be compared with references."""
    return model.make_tiny_bert(str(tmp_path_factory.mktemp("tiny-nodrop")), dropout=0.0)
