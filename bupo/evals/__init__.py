"""Evaluation and analysis entry points: `bupo passk` = `python -m bupo.evals.passk` (avg@n, unbiased pass@k),
`bupo entropy-flow` = `python -m bupo.evals.entropy_flow` (internal-policy entropy flow, paper Figs. 2-3; the core
is bupo.analysis), `bupo compare` = `python -m bupo.evals.compare` (runs grouped by setting, means and t-intervals
over seeds) and `bupo lens` = `python -m bupo.evals.lens` (the top tokens, entropy and rank of the final prediction
under every internal policy pi^l)."""

from pathlib import Path

import torch

from bupo import models


def resolve_model(name: str) -> Path:
    """'smollm2' -> the packaged SmolLM2-135M-Instruct (converted from GGUF once); else a local HF folder."""
    return models.resolve_model_path(name, flag="--model")


def context_length(path: Path) -> int:
    """max_position_embeddings of the model folder's config.json (read on the meta device: no weight is loaded), for
    the context check every sampling or scoring command makes before any work (bupo.cli.check_context)."""
    return models.build_meta(path).config.max_position_embeddings


def pick_device(name: str) -> str:
    """--device: 'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N' of a device that exists."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device={name!r} is invalid; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device={name!r} is invalid; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device={name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return name


def load_model(args) -> tuple[Path, torch.nn.Module]:
    """The model of an evals command from its --model, --device, --dtype and --out flags, in eval mode: the flags
    and the output folder are checked before any weight is read. Returns (model folder, model)."""
    from bupo.cli import check_out_dir

    device = pick_device(args.device)
    path = resolve_model(args.model)
    check_out_dir(args.out, "--out")
    return path, models.load_pretrained(path, dtype=getattr(torch, args.dtype), device=device).eval()
