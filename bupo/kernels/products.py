"""Matrix products of bf16 operands with fp32 accumulation and an fp32 result: logits never rounded to bf16.

    logits = fp32_logits(hidden, weight)       # hidden [N, H], weight [V, H] -> [N, V] fp32

A plain bf16 product returns bf16: logits of size ~30 come back rounded by up to 0.06 (half an ulp of 2^-3), far
too coarse for log-probs. Eager PyTorch has no bf16 x bf16 -> fp32 product on the CPU (`torch.mm(..., out_dtype=)`
is CUDA/XPU-only, also under torch.compile), so the operands are upcast to fp32 (exact) and multiplied in fp32,
inside oneDNN's "bf16 math mode" for fp32 products (torch.backends.mkldnn.matmul.fp32_precision = "bf16", torch >=
2.9), which allows oneDNN to round fp32 operands to bf16 and use bf16 kernels with fp32 accumulation. For bf16 values
upcast to fp32 that rounding is exact, so the result is the same fp32-accumulated product either way (up to
summation order). Whether the mode is faster depends on oneDNN's kernels for the CPU: on this project's CI machine
(AMD EPYC with AVX512-BF16, no AMX; torch 2.13) ONEDNN_VERBOSE shows it keeps its fp32 kernel
(`brg_matmul:avx512_core ... attr-fpmath:bf16`), so these products cost fp32 time there, while plain bf16 products
run on `avx512_core_bf16`. `fp32_products_in_bf16` sets the mode only around a block of products; `bf16_units(t)`
says where it applies.

On CUDA, cuBLAS multiplies the 16-bit operands with out_dtype=float32.
"""

import contextlib
import functools

import torch


@functools.cache
def _cpu_has_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_units(t: torch.Tensor) -> bool:
    """Whether `t` is a bf16 CPU tensor whose products can use oneDNN's bf16 math mode (`fp32_products_in_bf16`):
    torch >= 2.9 has the setting and oneDNN reports bf16 support for this CPU (AVX512-BF16 or AMX-BF16). False for
    every other dtype or device."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return (t.dtype == torch.bfloat16 and t.device.type == "cpu" and hasattr(matmul, "fp32_precision")
            and torch.backends.mkldnn.is_available() and _cpu_has_bf16())


@contextlib.contextmanager
def fp32_products_in_bf16(on: bool = True):
    """Inside, oneDNN may run fp32 CPU matrix products as bf16 products with fp32 accumulation (its bf16 math mode):
    exact for operands that are bf16 values; an fp32 operand that is not one may be rounded to bf16. Only the matmul
    setting changes, only inside, and it is restored after an error too; it is process-wide, so products in other
    threads meanwhile see it as well (bupo runs none). `on=False` does nothing."""
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


def weight_fp32(weight: torch.Tensor) -> torch.Tensor | None:
    """A 16-bit CPU `weight` upcast to fp32 once, for fp32_logits(..., weight_fp32=) called many times with it;
    None where fp32_logits needs no upcast copy (fp32/fp64 weights, CUDA)."""
    if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
        return weight.float()
    return None


def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor, *, weight_fp32: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [N, H] @ weight [V, H]^T -> [N, V] fp32 (fp64 for fp64 inputs), accumulated in fp32 and never
    rounded to 16 bit (16-bit CPU operands: upcast, in oneDNN's bf16 math mode where it applies; see the module
    docstring).

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


__all__ = ["bf16_units", "fp32_products_in_bf16", "fp32_logits", "weight_fp32"]
