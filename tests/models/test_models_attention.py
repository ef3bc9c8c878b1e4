"""Attention backend dispatch: the CPU path is silent, fallbacks warn once, GPU kernels agree with SDPA."""

import warnings

import pytest
import torch
from tiny_models import TINY
from torch.testing import assert_close

from bupo import models
from bupo.models import attention


def _qkv(N: int, nh: int, nkv: int, hd: int, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    mk = lambda n: torch.randn(1, N, n, hd, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(nh), mk(nkv), mk(nkv)


def test_cpu_sdpa_is_the_designed_path_and_does_not_warn():
    m = models.build_model(TINY["qwen3_tied"])
    ids = torch.randint(0, 101, (1, 12))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(ids, cu_seqlens=cu)
        m(ids)


def test_packed_attention_never_crosses_sequences():
    q, k, v = _qkv(9, 4, 2, 8)
    p = attention.packing(torch.tensor([0, 4, 9]), 9, torch.device("cpu"))
    out = attention.causal_attention(q, k, v, p)
    assert_close(out[:, 4:], attention.causal_attention(q[:, 4:], k[:, 4:], v[:, 4:]))
    v2 = v.clone()
    v2[:, :4] = 100.0  # the first sequence's values must not reach the second
    assert_close(attention.causal_attention(q, k, v2, p)[:, 4:], out[:, 4:])
    assert_close(attention.packed_positions(p), torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]]))


def test_warn_once(monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(3):
            attention._warn_once("fallback X")
    assert [str(w.message) for w in got] == ["fallback X"]


def test_fully_masked_decode_rows_stay_finite():
    q, k, v = _qkv(3, 4, 2, 8)
    mask = attention.decode_mask(torch.tensor([[False, False, True]]), 0, 3)
    assert mask[0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert torch.isfinite(attention.masked_attention(q, k, v, mask)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_backend_matches_sdpa_per_sequence(dtype):
    q, k, v = _qkv(300, 8, 2, 64, dtype=dtype, device="cuda")
    cu = torch.tensor([0, 17, 200, 300], dtype=torch.int32)
    p = attention.packing(cu, 300, torch.device("cuda"))
    got = attention.causal_attention(q, k, v, p)
    ref = attention._sdpa_packed(q.float(), k.float(), v.float(), p).to(dtype)
    tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert_close(got, ref, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 3])
def test_16bit_masked_attention_on_cpu_within_2x_sdpa_error(dtype, t):
    """16-bit masked attention on the CPU (the decode path, grouped K/V heads, a ragged mask) against fp64 SDPA on
    the same values: within 2x the error of torch's SDPA run in that dtype."""
    g = torch.Generator().manual_seed(0)
    B, nh, nkv, hd, S = 5, 6, 2, 16, 23
    q, k, v = (torch.randn(B, n, nh if i == 0 else nkv, hd, generator=g).to(dtype) * 2
               for i, n in enumerate((t, S, S)))
    mask = torch.rand(B, t, S, generator=g) > 0.3
    mask[..., -1] = True  # every row sees at least one key
    exact = attention._sdpa(q.double(), k.double(), v.double(), attn_mask=mask[:, None])
    got = attention.masked_attention(q, k, v, mask)
    assert got.dtype == dtype and got.shape == q.shape
    err = float((got.double() - exact).abs().max())
    ref = float((attention._sdpa(q, k, v, attn_mask=mask[:, None]).double() - exact).abs().max())
    assert 0 < err <= 2 * ref, (err, ref)


def test_16bit_masked_attention_ignores_the_default_dtype():
    """The grouped path computes in fp32 whatever torch.get_default_dtype() says (a caller's fp64 default once made
    its fp32 products meet fp64 buffers)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 1, n, 8, generator=g).bfloat16() for n in (4, 2, 2))
    mask = torch.ones(2, 1, 5, dtype=torch.bool)
    k, v = torch.cat([k] * 5, 1), torch.cat([v] * 5, 1)  # [2, 5, 2, 8]
    want = attention.masked_attention(q, k, v, mask)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = attention.masked_attention(q, k, v, mask)
    finally:
        torch.set_default_dtype(before)
    assert torch.equal(got, want)


def test_16bit_masked_attention_goes_to_sdpa_past_the_memory_bound(monkeypatch):
    """The fp32 grouped path holds scores and K/V in fp32; past GROUPED_MAX_ELEMENTS (a long prompt's prefill) the
    call is SDPA's, exactly."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 7, n, 8, generator=g).bfloat16() for n in (4, 2, 2))
    mask = torch.ones(2, 7, 7, dtype=torch.bool).tril()
    need = 2 * 7 * (4 * 7 + 2 * 2 * 8)  # B S (nh t + 2 nkv hd)
    calls = []
    grouped = attention._grouped_fp32
    monkeypatch.setattr(attention, "_grouped_fp32", lambda *a: calls.append(1) or grouped(*a))
    monkeypatch.setattr(attention, "GROUPED_MAX_ELEMENTS", need)
    attention.masked_attention(q, k, v, mask)
    assert calls == [1]
    monkeypatch.setattr(attention, "GROUPED_MAX_ELEMENTS", need - 1)
    got = attention.masked_attention(q, k, v, mask)
    assert calls == [1]
    assert torch.equal(got, attention._sdpa(q, k, v, attn_mask=mask[:, None]))
