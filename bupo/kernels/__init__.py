"""Fused kernels: log-prob and entropy of softmax(h W^T / T) without materializing [N, V] logits.

linear_logprob_entropy(hidden, weight, labels, *, temperature, ignore_index, backend) -> (logp, entropy)
linear_entropy(hidden, weight, *, temperature, backend) -> entropy          (forward only)
linear_entropy_many(hiddens, weight, *, temperature, backend) -> [entropy]  (one pass over weight)
fp32_logits(hidden, weight) -> logits [N, V] fp32, never rounded to bf16 (bupo/kernels/products.py)
Microbenchmarks: python -m bupo.kernels.bench --help
"""
from bupo.kernels.linear_entropy import linear_entropy, linear_entropy_many
from bupo.kernels.linear_logprob_entropy import linear_logprob_entropy
from bupo.kernels.products import fp32_logits

__all__ = ["linear_logprob_entropy", "linear_entropy", "linear_entropy_many", "fp32_logits"]
