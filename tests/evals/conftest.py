"""Fixtures for the evals tests: a tiny random Llama folder with the real SmolLM2 tokenizer files."""

import shutil
from pathlib import Path

import pytest

from bupo import models


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A 3-layer random Llama saved as an HF folder with SmolLM2's tokenizer (chat template included)."""
    d = tmp_path_factory.mktemp("tiny_chat")
    try:
        tok_src = models.smollm2_path()
    except ImportError as e:
        pytest.skip(str(e))
    cfg = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True}
    models.save_pretrained(models.build_model(cfg, seed=0), d)
    for f in tok_src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation")):
            shutil.copy(f, d / f.name)
    return d
