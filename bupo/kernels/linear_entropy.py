"""Entropy of softmax(h W^T / T) per row, forward only: the internal-policy entropy analysis.

Legend: N rows, H hidden size, V vocabulary, T temperature; h [N, H], W [V, H].
    entropy_n = -sum_j p_nj log p_nj,  p_n = softmax(h_n W^T / T)        [N] fp32 (fp64 for fp64 inputs)
Same math, tiling, denormal guard and backends as `linear_logprob_entropy` (whose forward this reuses):
the logits are never held beyond one tile, and nothing is saved (it runs under torch.no_grad).
FLOPs: 2NHV. `linear_entropy_many` stacks many hidden-state sets (every layer and module of a model) and
makes one pass over W for all of them: the V-chunk loop reads each chunk of W once and applies it to all rows.
"""
import torch

from bupo.kernels import chunked
from bupo.kernels.linear_logprob_entropy import (
    _check_inputs,
    _resolve_backend,
    _triton_forward,
    linear_logprob_entropy_reference,
)


def _entropy(hidden: torch.Tensor, weight: torch.Tensor, inv_t: float, backend: str) -> torch.Tensor:
    out = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if backend == "naive":
        labels = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        return linear_logprob_entropy_reference(hidden, weight, labels, temperature=1.0 / inv_t)[1].to(out)
    if backend == "triton":
        no_labels = torch.full((hidden.shape[0],), -1, dtype=torch.long, device=hidden.device)
        return _triton_forward(hidden.contiguous(), weight.contiguous(), no_labels, inv_t)[2].to(out)
    return chunked.forward(hidden, weight, None, inv_t)[2].to(out)


@torch.no_grad()
def linear_entropy(hidden: torch.Tensor, weight: torch.Tensor, *, temperature: float = 1.0,
                   backend: str = "auto") -> torch.Tensor:
    """Entropy of softmax(hidden @ weight.T / temperature) per row: hidden [N, H], weight [V, H] -> [N] fp32.

    backend: "auto" (triton on CUDA, else torch), "triton", "torch" (chunked) or "naive" (materializes logits).
    Not differentiable (use linear_logprob_entropy for gradients).
    """
    _check_inputs(hidden, weight, temperature)
    return _entropy(hidden, weight, 1.0 / temperature, _resolve_backend(hidden, backend))


@torch.no_grad()
def linear_entropy_many(hiddens: list[torch.Tensor], weight: torch.Tensor, *, temperature: float = 1.0,
                        backend: str = "auto") -> list[torch.Tensor]:
    """linear_entropy for many hidden-state sets [N_i, H] at once, with one pass over weight.

    Returns one [N_i] fp32 tensor per set, in order. The sets are concatenated (sum_i N_i x H must fit in
    memory; split the list into groups otherwise).
    """
    if not isinstance(hiddens, (list, tuple)):
        raise ValueError(f"hiddens must be a list of [N_i, H] tensors, got {type(hiddens).__name__}")
    if not hiddens:
        return []
    for i, h in enumerate(hiddens):
        try:
            _check_inputs(h, weight, temperature)
        except ValueError as e:
            raise ValueError(f"hiddens[{i}]: {e}") from None
    stacked = torch.cat(list(hiddens)) if len(hiddens) > 1 else hiddens[0]  # [sum N_i, H]
    ent = _entropy(stacked, weight, 1.0 / temperature, _resolve_backend(stacked, backend))
    return list(ent.split([h.shape[0] for h in hiddens]))
