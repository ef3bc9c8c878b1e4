"""Matrix products of bf16 operands with fp32 accumulation and an fp32 result, at the speed of bf16 matrix units.

    logits = fp32_logits(hidden, weight)       # hidden [N, H], weight [V, H] -> [N, V] fp32, never rounded to bf16

A plain bf16 product returns bf16: logits of size ~30 come back rounded by up to 0.06 (half an ulp of 2^-3), far
too coarse for log-probs. Eager PyTorch has no bf16 x bf16 -> fp32 product on the CPU (`torch.mm(..., out_dtype=)`
is CUDA-only), but oneDNN has a "bf16 math mode" for fp32 products (torch.backends.mkldnn.matmul.fp32_precision =
"bf16", torch >= 2.9): it rounds fp32 operands to bf16 and multiplies them on the bf16 units (AMX-BF16,
AVX512-BF16) with fp32 accumulation. For operands that are bf16 values upcast to fp32 that rounding is exact, so the
result is the fp32-accumulated product of the bf16 operands. `fp32_products_in_bf16` sets the mode only around a
block of products and restores it afterwards; `bf16_units(t)` says where it applies.

Where it does not (another CPU, older torch), the operands are upcast and multiplied in fp32: the same values up to
accumulation order, slower. On CUDA, cuBLAS multiplies the 16-bit operands with out_dtype=float32.
"""

import contextlib
import functools

import torch


@functools.cache
def _cpu_has_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_units(t: torch.Tensor) -> bool:
    """Whether products of the bf16 CPU tensor `t` can run on bf16 matrix units with fp32 accumulation and fp32
    output (`fp32_products_in_bf16`): t is bf16 on the CPU, torch >= 2.9 has the oneDNN setting and the CPU has
    bf16 units. False for every other dtype or device."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return (t.dtype == torch.bfloat16 and t.device.type == "cpu" and hasattr(matmul, "fp32_precision")
            and torch.backends.mkldnn.is_available() and _cpu_has_bf16())


@contextlib.contextmanager
def fp32_products_in_bf16(on: bool = True):
    """Inside, fp32 CPU matrix products run on bf16 units with fp32 accumulation (oneDNN's bf16 math mode): exact
    products for operands that are bf16 values, and an fp32 operand that is not one is rounded to bf16 first.
    Only the matmul setting changes, only inside, and it is restored after an error too. `on=False` does nothing."""
    if not on:
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor, *, weight_fp32: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [N, H] @ weight [V, H]^T -> [N, V] fp32 (fp64 for fp64 inputs), accumulated in fp32 and never
    rounded to 16 bit, on bf16 matrix units where bf16 operands and the CPU allow (see the module docstring).

    weight_fp32: `weight` already upcast to fp32 ([V, H]), for a caller that multiplies the same weight many times
    (a sampler's head at every decode step): the upcast then happens once, not per call. It must hold exactly
    weight's values. Raises ValueError on mismatched shapes or dtypes."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fp32_logits: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be "
                         "[N, H] and [V, H]")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fp32_logits: hidden is {hidden.dtype}, weight is {weight.dtype}; they must match")
    if weight_fp32 is not None and (weight_fp32.dtype != torch.float32 or weight_fp32.shape != weight.shape):
        raise ValueError(f"fp32_logits: weight_fp32 must be float32 of shape {tuple(weight.shape)}, got "
                         f"{weight_fp32.dtype} {tuple(weight_fp32.shape)}")
    if hidden.dtype in (torch.float32, torch.float64):
        return hidden @ weight.T
    if hidden.is_cuda:
        return torch.mm(hidden, weight.T, out_dtype=torch.float32)
    w = weight.float() if weight_fp32 is None else weight_fp32
    with fp32_products_in_bf16(bf16_units(hidden)):
        return hidden.float() @ w.T


__all__ = ["bf16_units", "fp32_products_in_bf16", "fp32_logits"]
