"""bupo.kernels.products: fp32 logits from bf16 operands (fp32 accumulation, never rounded to bf16), on the CPU's
bf16 units where it has them, with the oneDNN setting touched only inside."""

import pytest
import torch

from bupo.kernels import products as P


def _operands(N=37, H=96, V=1003, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 3).bfloat16()  # logits of size ~30, as a trained model's
    w = torch.randn(V, H, generator=g).bfloat16()
    return h, w


def test_fp32_logits_of_bf16_operands_are_fp32_accurate():
    """Against the exact product of the same bf16 values (fp64): as accurate as an fp32 product of them, and >100x
    more accurate than the plain bf16 product (which rounds each logit to bf16)."""
    h, w = _operands()
    exact = h.double() @ w.double().T  # [N, V]
    got = P.fp32_logits(h, w)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    err = float((got.double() - exact).abs().max())
    fp32_err = float(((h.float() @ w.float().T).double() - exact).abs().max())
    bf16_err = float(((h @ w.T).double() - exact).abs().max())
    assert err <= 4 * fp32_err + 1e-6 and err * 100 < bf16_err, (err, fp32_err, bf16_err)


def test_fp32_logits_with_a_cached_fp32_weight_equals_without():
    h, w = _operands()
    torch.testing.assert_close(P.fp32_logits(h, w, weight_fp32=w.float()), P.fp32_logits(h, w), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp32_logits_of_full_precision_operands_is_the_plain_product(dtype):
    h, w = (t.to(dtype) for t in _operands())
    got = P.fp32_logits(h, w)
    assert got.dtype == dtype
    torch.testing.assert_close(got, h @ w.T, rtol=0, atol=0)


def test_fp32_logits_leaves_the_matmul_setting_as_it_was():
    h, w = _operands(5, 8, 11)
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    before = getattr(matmul, "fp32_precision", None)
    P.fp32_logits(h, w)
    assert getattr(matmul, "fp32_precision", None) == before
    x = torch.randn(4, 8)
    torch.testing.assert_close(x @ x.T, (x.double() @ x.double().T).float(), rtol=1e-6, atol=1e-6)  # fp32 again


BF16 = torch.bfloat16


@pytest.mark.parametrize("h, w, match", [
    (torch.zeros(3, 4, dtype=BF16), torch.zeros(5, 6, dtype=BF16), r"hidden \(3, 4\) and weight \(5, 6\)"),
    (torch.zeros(3, 4, dtype=BF16), torch.zeros(5, 4), "hidden is torch.bfloat16, weight is torch.float32"),
    (torch.zeros(4, dtype=BF16), torch.zeros(5, 4, dtype=BF16), r"hidden \(4,\)"),
])
def test_fp32_logits_refuses_mismatched_operands(h, w, match):
    with pytest.raises(ValueError, match=match):
        P.fp32_logits(h, w)


def test_fp32_logits_refuses_a_weight_fp32_that_is_not_the_weight():
    h, w = _operands(3, 4, 5)
    with pytest.raises(ValueError, match=r"weight_fp32 must be float32 of shape \(5, 4\)"):
        P.fp32_logits(h, w, weight_fp32=w)  # bf16, not fp32
