"""linear_logprob_entropy against the fp64 "naive" spec: forward, both gradients, odd shapes, all backends.

Tolerances (max abs error, relative to the largest reference value): fp32 within 1e-5, or within 2x the error
of the naive PyTorch path run in fp32 where that is larger (peaked logits carry fp32 rounding noise of about
|z| * 6e-8 that every implementation shares); bf16/fp16 within 2x the error of the naive path run in that
dtype. Both get a slack of 1e-6 of the largest reference value.
Triton tests (`triton_` in the name) run where kernels can run: CUDA, or CPU under TRITON_INTERPRET=1; without
either they are re-run in a child pytest process with TRITON_INTERPRET=1 set before triton is imported.
"""
import os
import subprocess
import sys

import pytest
import torch

from bupo import kernels
from bupo.kernels import chunked, products
from bupo.kernels.bench import peak_allocated_bytes
from bupo.kernels.linear_logprob_entropy import _INTERPRET, _triton_forward, tl, triton

f = kernels.linear_logprob_entropy
M = sys.modules["bupo.kernels.linear_logprob_entropy"]
TRITON_HERE = triton is not None and (_INTERPRET or torch.cuda.is_available())
TRITON_DEV = "cpu" if _INTERPRET or not torch.cuda.is_available() else "cuda"
needs_triton_here = pytest.mark.skipif(not TRITON_HERE, reason="run by test_triton_subprocess")
SCALE = {"normal": 0.3, "peaked": 2.5, "flat": 1e-3}  # logit std ~ SCALE * sqrt(H): ~2, ~20, ~0.01


def make(N, H, V, regime="normal", dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g) * SCALE[regime]
    w = torch.randn(V, H, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[1::3] = -100  # every third row from the second on is ignored
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return h.to(device, dtype), w.to(device, dtype), y.to(device), g_lp.to(device), g_ent.to(device)


def run(h, w, y, g_lp, g_ent, temperature, backend):
    """-> logp, entropy, dh, dW (fp64 on CPU) for loss = sum(g_lp * logp + g_ent * entropy)."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logp, ent = f(h, w, y, temperature=temperature, backend=backend)
    (logp * g_lp.to(logp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    assert logp.dtype == ent.dtype == (torch.float64 if h.dtype == torch.float64 else torch.float32)
    assert h.grad.dtype == h.dtype and w.grad.dtype == w.dtype
    return [t.detach().double().cpu() for t in (logp, ent, h.grad, w.grad)]


def check(got, ref, lowp, rtol, what):
    for name, g, r, lo in zip(("logp", "entropy", "dh", "dW"), got, ref, lowp):
        scale = r.abs().max().item()
        err, err_lowp = (g - r).abs().max().item(), (lo - r).abs().max().item()
        tol = max(rtol * scale, 2 * err_lowp) + 1e-6 * scale + 1e-30
        assert err <= tol, f"{what} {name}: max err {err:.3e} > tol {tol:.3e} (naive {err_lowp:.3e}, |ref| {scale:.3e})"


def compare(backend, N, H, V, temperature, regime, dtype=torch.float32, device="cpu"):
    h, w, y, g_lp, g_ent = make(N, H, V, regime, dtype, device=device)
    ref = run(h.double(), w.double(), y, g_lp, g_ent, temperature, "naive")
    lowp = run(h, w, y, g_lp, g_ent, temperature, "naive")
    got = run(h, w, y, g_lp, g_ent, temperature, backend)
    check(got, ref, lowp, 1e-5 if dtype == torch.float32 else 0.0, f"{backend} {dtype} N={N} V={V} {regime}")
    return got


CASES = [  # N, H, V, temperature, regime
    (1, 32, 1009, 1.0, "normal"),
    (33, 64, 1009, 0.7, "peaked"),
    (17, 48, 5003, 1.3, "normal"),
    (33, 64, 5003, 0.7, "flat"),
    (7, 64, 5003, 1.3, "peaked"),
]


@pytest.mark.parametrize("N,H,V,temperature,regime", CASES)
def test_torch_fp32_matches_reference(N, H, V, temperature, regime, monkeypatch):
    monkeypatch.setattr(chunked, "TILE_COLS", 512)  # several V chunks (the last one partial) and row tiles
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 512 * 4 * 5)
    compare("torch", N, H, V, temperature, regime)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H,V,temperature,regime", [(17, 64, 5003, 0.7, "normal"), (9, 64, 1009, 1.3, "peaked")])
def test_torch_low_precision_within_2x_naive(N, H, V, temperature, regime, dtype, monkeypatch):
    monkeypatch.setattr(chunked, "TILE_COLS", 1024)
    compare("torch", N, H, V, temperature, regime, dtype)


def test_torch_fp64_is_exact():
    h, w, y, g_lp, g_ent = make(9, 16, 1009, "normal", torch.float64)
    for got, ref in zip(run(h, w, y, g_lp, g_ent, 0.7, "torch"), run(h, w, y, g_lp, g_ent, 0.7, "naive")):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)


def test_ignored_rows_give_zero_and_get_no_gradient():
    h, w, y, g_lp, g_ent = make(10, 16, 1009)
    y[:] = -100
    y[4] = 3
    for backend in ("torch", "naive"):
        logp, ent, dh, dw = run(h, w, y, g_lp, g_ent, 1.0, backend)
        ignored = y == -100
        assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all() and (dh[ignored] == 0).all()
        assert logp[4] < 0 and ent[4] > 0 and dh[4].abs().sum() > 0
    y = torch.where(y == -100, 0, y)
    y[4] = -1
    logp, ent = f(h, w, y, ignore_index=-1)
    assert logp[4] == 0 and ent[4] == 0 and logp[0] != 0


def test_empty_batch_and_auto_backend():
    h, w, y, g_lp, g_ent = make(0, 16, 1009)
    logp, ent, dh, dw = run(h, w, y, g_lp, g_ent, 1.0, "auto")
    assert logp.shape == ent.shape == (0,) and dh.shape == (0, 16) and (dw == 0).all()
    h, w, y, g_lp, g_ent = make(5, 16, 1009)
    for a, b in zip(run(h, w, y, g_lp, g_ent, 1.0, "auto"), run(h, w, y, g_lp, g_ent, 1.0, "torch")):
        assert torch.equal(a, b)  # CPU tensors: "auto" is "torch"


def test_gradient_through_one_output_and_tiny_upstream_gradients():
    h, w, y, g_lp, g_ent = make(13, 32, 1009, "peaked")
    for scale in (1.0, 1e-30):  # 1e-30 would put dz in the denormal range without the row normalization
        for gl, ge in ((g_lp * scale, g_ent * 0), (g_lp * 0, g_ent * scale)):
            got = run(h, w, y, gl, ge, 1.0, "torch")[2:]
            ref = run(h.double(), w.double(), y, gl, ge, 1.0, "naive")[2:]
            for g, r in zip(got, ref):
                assert (g - r).abs().max() <= 1e-5 * r.abs().max()


def test_bad_inputs_raise_value_errors():
    h, w, y, _, _ = make(5, 16, 1009)
    with pytest.raises(ValueError, match=r"backend='cuda'.*'auto', 'triton', 'torch', 'naive'"):
        f(h, w, y, backend="cuda")
    with pytest.raises(ValueError, match=r"hidden must be 2-D"):
        f(h[0], w, y)
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H=16"):
        f(h, w[:, :8], y)
    with pytest.raises(ValueError, match=r"labels must be \[N\] with N=5"):
        f(h, w, y[:4])
    with pytest.raises(ValueError, match=r"labels must be int64 or int32"):
        f(h, w, y.float())
    with pytest.raises(ValueError, match=r"weight dtype torch.float64 differs"):
        f(h, w.double(), y)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1009\)"):
        f(h, w, torch.full_like(y, 1009))
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
        f(h, w, y, temperature=0.0)
    if not TRITON_HERE and triton is not None:
        with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1"):
            f(h, w, y, backend="triton")


def test_torch_memory_does_not_grow_with_n_times_v():
    V, H = 151936, 8  # Qwen3 vocabulary
    w = (torch.randn(V, H) * 0.1).requires_grad_()
    saved = []

    def activation_bytes(N, backend):
        h = torch.randn(N, H).requires_grad_()
        y = torch.randint(0, V, (N,))
        w.grad = None

        def step():
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
                logp, ent = f(h, w, y, backend=backend)
            (logp.sum() + ent.sum()).backward()

        return peak_allocated_bytes(step, outputs=lambda: (h.grad, w.grad))  # dh, dW are outputs

    for N in (16, 512):
        saved.clear()
        act = activation_bytes(N, "torch")
        assert max(s.numel() for s in saved) <= V * H, saved  # nothing [N, V]-sized is saved for backward
        assert act <= 2 * chunked.CHUNK_BYTES + 8 * N * H * 4 + (1 << 20), (N, act)  # two tiles + O(N H)
        assert act < 0.15 * N * V * 4, (N, act)
    assert activation_bytes(128, "naive") > 3 * 128 * V * 4  # the probe does see materialized logits


# --- Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1); shapes stay tiny for the interpreter ----------
TRITON_CASES = [  # N, H, V, temperature, regime
    (1, 16, 37, 1.0, "normal"),
    (17, 40, 1009, 0.7, "normal"),
    (7, 32, 257, 1.3, "peaked"),
    (9, 16, 300, 1.0, "flat"),
]


@needs_triton_here
@pytest.mark.parametrize("N,H,V,temperature,regime", TRITON_CASES)
def test_triton_fp32_matches_reference(N, H, V, temperature, regime):
    compare("triton", N, H, V, temperature, regime, device=TRITON_DEV)


@needs_triton_here
def test_triton_bf16_within_2x_naive_and_chunked_backward(monkeypatch):
    monkeypatch.setattr(M, "DZ_CHUNK_BYTES", 2048)  # dz chunks of 2048 / (N * 2) columns -> a few V chunks
    compare("triton", 17, 32, 1009, 1.3, "normal", torch.bfloat16, device=TRITON_DEV)


@needs_triton_here
def test_triton_v_splits_combine_exactly():
    h, w, y, _, _ = make(5, 16, 1009, device=TRITON_DEV)
    y = y.clamp(min=0)
    one = _triton_forward(h, w, y, 1 / 0.7, splits=1)
    many = _triton_forward(h, w, y, 1 / 0.7, splits=7)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_triton_here
def test_triton_gradient_of_one_input_only():
    h, w, y, g_lp, g_ent = make(9, 16, 300, device=TRITON_DEV)
    both = run(h, w, y, g_lp, g_ent, 0.7, "triton")
    for wrt in ("h", "w"):
        hh, ww = h.clone().requires_grad_(wrt == "h"), w.clone().requires_grad_(wrt == "w")
        logp, ent = f(hh, ww, y, temperature=0.7, backend="triton")
        (logp * g_lp + ent * g_ent).sum().backward()
        grad, other = (hh, ww) if wrt == "h" else (ww, hh)
        assert other.grad is None
        torch.testing.assert_close(grad.grad.double().cpu(), both[2 if wrt == "h" else 3])


@pytest.mark.skipif(not _INTERPRET, reason="a CPU stand-in for CUDA; run by test_triton_subprocess")
@pytest.mark.parametrize("addmm_fp32_c", [True, False])  # torch >= 2.10; torch 2.8 and 2.9
def test_triton_cuda_gemm_paths_with_a_stand_in(addmm_fp32_c, monkeypatch):
    """The backward's 16-bit CUDA GEMM calls (out_dtype=float32), run on CPU against stand-ins for torch.mm and
    torch.addmm that check the rules CUDA's kernels enforce and sum in fp32: catches wrong dtypes, scratch shapes
    and slices, which the CPU upcast path would not exercise."""
    real_mm, calls = torch.mm, []

    def mm(a, b, out_dtype=None, *, out=None):
        assert out_dtype == torch.float32 and a.dtype == b.dtype == torch.bfloat16, (out_dtype, a.dtype, b.dtype)
        assert out.dtype == torch.float32 and out.shape == (a.shape[0], b.shape[1]), (out.dtype, out.shape)
        calls.append("mm")
        return out.copy_(real_mm(a.float(), b.float()))

    def addmm(c, a, b, out_dtype=None, *, out=None):
        assert addmm_fp32_c and out_dtype == c.dtype == torch.float32 and out is c and a.dtype == b.dtype
        calls.append("addmm")
        return c.add_(real_mm(a.float(), b.float()))

    monkeypatch.setattr(M, "_lowp_gemm_on_cuda", lambda t: t.dtype == torch.bfloat16)
    monkeypatch.setattr(M, "_ADDMM_FP32_C", addmm_fp32_c)
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    monkeypatch.setattr(M, "DZ_CHUNK_BYTES", 2048)  # several V chunks, the last one shorter
    compare("triton", 17, 32, 1009, 1.3, "normal", torch.bfloat16, device="cpu")
    n_chunks = len(calls) // 2
    assert n_chunks > 2 and calls == ["addmm" if addmm_fp32_c else "mm", "mm"] * n_chunks  # dh, then dW_c


if triton is not None:
    @triton.jit
    def _int32_row_offset_kernel(x_ptr, stride):  # the bug class the check below must catch
        row = tl.program_id(0)
        tl.store(x_ptr + row * stride, 1.0)


@pytest.mark.skipif(not _INTERPRET, reason="reads the interpreter's pointer arithmetic; run by test_triton_subprocess")
def test_triton_offsets_are_int64(monkeypatch):
    """Every offset added to a uniform pointer (a kernel argument, or one moved by a scalar) is int64, in every
    kernel, forward and backward: the rule that keeps `rows * stride` from wrapping at 2^31 elements (N x H and
    V x H pass that at real shapes), checked without allocating that much. Smaller offsets (`+ k` inside a row)
    go onto pointers that already differ per row and may stay int32."""
    from triton.runtime import interpreter
    real = interpreter.InterpreterBuilder.create_addptr
    seen = []

    def spy(self, ptr, offset):
        uniform = bool((ptr.data == ptr.data.flat[0]).all())
        seen.append((uniform, offset.data.dtype.itemsize))
        return real(self, ptr, offset)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_addptr", spy)
    _int32_row_offset_kernel[(2,)](torch.zeros(8), 4)
    assert (True, 4) in seen  # the spy sees an int32 offset on a uniform pointer
    seen.clear()
    compare("triton", 17, 40, 300, 0.7, "normal", device="cpu")  # forward and backward kernels
    kernels.linear_entropy(*make(5, 16, 100)[:2], backend="triton")
    assert (True, 8) in seen and (False, 4) in seen  # both kinds of pointer arithmetic occurred
    assert (True, 4) not in seen, "an int32 offset on a uniform pointer: take the program id to int64 first"


def test_triton_subprocess():
    if TRITON_HERE or triton is None:
        pytest.skip("triton tests run directly in this process" if TRITON_HERE else "triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "triton_"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_torch_bf16_forward_is_fp32_accurate_and_leaves_matmul_precision_alone(temperature, monkeypatch):
    """bf16 h and W on the CPU: logits accumulate in fp32 and are never rounded to bf16 (on bf16 matrix units where
    the CPU has them, products.bf16_units), so log-probs and entropies are as accurate as the fp32 path's on the same
    values, far inside the naive bf16 error. The oneDNN matmul setting is back to what it was afterwards."""
    monkeypatch.setattr(chunked, "TILE_COLS", 1024)
    h, w, y, g_lp, g_ent = make(33, 64, 5003, "peaked", torch.bfloat16)
    before = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
    ref = run(h.double(), w.double(), y, g_lp, g_ent, temperature, "naive")
    got = run(h, w, y, g_lp, g_ent, temperature, "torch")
    fp32 = run(h.float(), w.float(), y, g_lp, g_ent, temperature, "torch")
    naive = run(h, w, y, g_lp, g_ent, temperature, "naive")
    for i, name in enumerate(("logp", "entropy")):
        scale = ref[i].abs().max().item()
        err, err_fp32 = (got[i] - ref[i]).abs().max().item(), (fp32[i] - ref[i]).abs().max().item()
        assert err <= max(4 * err_fp32, 1e-5 * scale), (name, err, err_fp32)
        assert err * 100 < (naive[i] - ref[i]).abs().max().item(), name  # the naive path rounds logits to bf16
    assert getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None) == before


def test_bf16_products_are_used_where_the_cpu_has_them():
    h = torch.zeros(2, 8, dtype=torch.bfloat16)
    has_api = hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision")
    assert products.bf16_units(h) == (has_api and torch.backends.mkldnn.is_available() and products._cpu_has_bf16())
    assert not products.bf16_units(h.float()) and not products.bf16_units(h.half())
    if has_api:
        with pytest.raises(RuntimeError), products.fp32_products_in_bf16(True):
            assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
            raise RuntimeError("inside")
        assert torch.backends.mkldnn.matmul.fp32_precision != "bf16"  # restored after an error too
