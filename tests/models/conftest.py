"""Fixtures for the model tests: tiny random configs, their transformers twins, the converted SmolLM2 folder."""

import os

import pytest
from tiny_models import TINY, hf_model

from bupo import models


@pytest.fixture(params=sorted(TINY))
def tiny_name(request) -> str:
    return request.param


@pytest.fixture
def pair(tiny_name, tmp_path):
    """(ours, hf): the same random weights, written by transformers' save_pretrained, read by our loader."""
    hf = hf_model(TINY[tiny_name])
    hf.save_pretrained(tmp_path / "hf")
    ours = models.load_pretrained(tmp_path / "hf")
    return ours, hf


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the packaged GGUF (once per session; reused from $BUPO_CACHE)."""
    pytest.importorskip("gguf")
    cache = os.environ.get("BUPO_CACHE") or tmp_path_factory.mktemp("bupo_cache")
    try:
        return models.smollm2_path(cache)
    except ImportError as e:
        pytest.skip(str(e))
