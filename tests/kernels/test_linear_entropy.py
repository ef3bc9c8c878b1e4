"""linear_entropy / linear_entropy_many against the fp64 "naive" spec (see test_linear_logprob_entropy.py for
the tolerance rules and how the `triton_` tests run on CPU)."""
import os
import subprocess
import sys

import pytest
import torch

from bupo import kernels
from bupo.kernels import chunked
from bupo.kernels.linear_logprob_entropy import _INTERPRET, triton

LE = sys.modules["bupo.kernels.linear_entropy"]
TRITON_HERE = triton is not None and (_INTERPRET or torch.cuda.is_available())
TRITON_DEV = "cpu" if _INTERPRET or not torch.cuda.is_available() else "cuda"
needs_triton_here = pytest.mark.skipif(not TRITON_HERE, reason="run by test_triton_subprocess")
SCALE = {"normal": 0.3, "peaked": 2.5, "flat": 1e-3}


def make(N, H, V, regime="normal", dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g) * SCALE[regime]
    return h.to(device, dtype), torch.randn(V, H, generator=g).to(device, dtype)


def check(backend, N, H, V, temperature, regime, dtype=torch.float32, device="cpu"):
    h, w = make(N, H, V, regime, dtype, device=device)
    ref = kernels.linear_entropy(h.double(), w.double(), temperature=temperature, backend="naive")
    lowp = kernels.linear_entropy(h, w, temperature=temperature, backend="naive")
    got = kernels.linear_entropy(h, w, temperature=temperature, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (N,)
    scale = ref.abs().max().item()
    err, err_lowp = (got.double() - ref).abs().max().item(), (lowp.double() - ref).abs().max().item()
    tol = max((1e-5 if dtype == torch.float32 else 0.0) * scale, 2 * err_lowp) + 1e-6 * scale
    assert err <= tol, f"{backend} {dtype} {regime}: err {err:.3e} > tol {tol:.3e} (naive {err_lowp:.3e})"


@pytest.mark.parametrize("N,H,V,temperature,regime", [
    (1, 32, 1009, 1.0, "normal"), (33, 64, 5003, 0.7, "peaked"), (17, 48, 5003, 1.3, "flat"),
    (9, 64, 1009, 1.3, "normal")])
def test_torch_matches_reference(N, H, V, temperature, regime, monkeypatch):
    monkeypatch.setattr(chunked, "TILE_COLS", 512)  # several V chunks and row tiles
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 512 * 4 * 4)
    check("torch", N, H, V, temperature, regime)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_low_precision_within_2x_naive(dtype):
    check("torch", 17, 64, 5003, 0.7, "normal", dtype)


def test_many_equals_single_calls_with_one_pass_over_weight(monkeypatch):
    sizes = [1, 7, 0, 33]
    hs = [make(n, 32, 1009, seed=i)[0] for i, n in enumerate(sizes)]
    w = make(1, 32, 1009)[1]
    single = [kernels.linear_entropy(h, w, temperature=0.7) for h in hs]
    calls = []
    real = chunked.forward
    monkeypatch.setattr(chunked, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    many = kernels.linear_entropy_many(hs, w, temperature=0.7)
    assert len(calls) == 1 and [t.shape[0] for t in many] == sizes
    for a, b in zip(many, single):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert kernels.linear_entropy_many([], w) == []


def test_no_graph_and_no_global_state_change():
    h, w = make(5, 16, 1009, "peaked")
    h.requires_grad_()
    ftz_before = (torch.tensor([1e-20]) * 1e-20).item() == 0.0
    assert not kernels.linear_entropy(h, w).requires_grad
    assert not kernels.linear_entropy_many([h, h], w)[0].requires_grad
    assert ((torch.tensor([1e-20]) * 1e-20).item() == 0.0) == ftz_before


def test_bad_inputs_raise_value_errors():
    h, w = make(5, 16, 1009)
    with pytest.raises(ValueError, match=r"backend='gpu'"):
        kernels.linear_entropy(h, w, backend="gpu")
    with pytest.raises(ValueError, match=r"temperature"):
        kernels.linear_entropy(h, w, temperature=-1.0)
    with pytest.raises(ValueError, match=r"hiddens\[1\]: weight must be \[V, H\] with H=8"):
        kernels.linear_entropy_many([h, h[:, :8]], w)
    with pytest.raises(ValueError, match=r"hiddens must be a list"):
        kernels.linear_entropy_many(h, w)


@needs_triton_here
@pytest.mark.parametrize("N,H,V,temperature,regime", [(1, 16, 37, 1.0, "normal"), (17, 40, 1009, 0.7, "peaked")])
def test_triton_matches_reference(N, H, V, temperature, regime):
    check("triton", N, H, V, temperature, regime, device=TRITON_DEV)


def test_triton_subprocess():
    if TRITON_HERE or triton is None:
        pytest.skip("triton tests run directly in this process" if TRITON_HERE else "triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "triton_"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-3000:]
