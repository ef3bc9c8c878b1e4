"""Evaluation and analysis entry points: `python -m evals.passk` (avg@n, unbiased pass@k) and
`python -m evals.entropy_flow` (internal-policy entropy flow, paper Figs. 2-3; the core is bupo.analysis)."""

from pathlib import Path


def resolve_model(name: str) -> Path:
    """'smollm2' -> the packaged SmolLM2-135M-Instruct (converted from GGUF once); else a local HF folder."""
    if name == "smollm2":
        import models

        return models.smollm2_path()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {name!r}: no config.json there; give a local Hugging Face model folder "
                         "or 'smollm2'")
    return path
