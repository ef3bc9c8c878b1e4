"""Shared fixtures of the trainer tests: a tiny random Llama with the real SmolLM2 tokenizer, and the trainer
arguments of a run on it (helpers in tiny_run.py, importable from these tests)."""

from pathlib import Path

import pytest
from tiny_run import tiny_model_folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 4-layer random Llama (H=32, SmolLM2's 49152-id vocabulary, tied head) saved as an HF folder with SmolLM2's
    tokenizer files. Read-only: a test that changes a model folder copies it first."""
    return tiny_model_folder(tmp_path_factory.mktemp("tiny"))
