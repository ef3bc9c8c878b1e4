"""Evaluation and analysis entry points: `python -m evals.passk` (avg@n, unbiased pass@k),
`python -m evals.entropy_flow` (internal-policy entropy flow, paper Figs. 2-3; the core is bupo.analysis),
`python -m evals.compare` (runs grouped by setting, means and t-intervals over seeds) and `python -m evals.lens`
(the top tokens, entropy and rank of the final prediction under every internal policy pi^l)."""

from pathlib import Path

import models


def resolve_model(name: str) -> Path:
    """'smollm2' -> the packaged SmolLM2-135M-Instruct (converted from GGUF once); else a local HF folder."""
    return models.resolve_model_path(name, flag="--model")
