"""Evaluation and analysis entry points: `python -m evals.passk` (avg@n, unbiased pass@k) and
`python -m evals.entropy_flow` (internal-policy entropy flow, paper Figs. 2-3; the core is bupo.analysis)."""

from pathlib import Path

import models


def resolve_model(name: str) -> Path:
    """'smollm2' -> the packaged SmolLM2-135M-Instruct (converted from GGUF once); else a local HF folder."""
    return models.resolve_model_path(name, flag="--model")
