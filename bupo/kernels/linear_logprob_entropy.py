"""Fused linear log-prob + entropy: (h, W, y, T) -> (log p(y), entropy) without holding [N, V] logits.

Legend: N rows (tokens), H hidden size, V vocabulary, T temperature; h [N, H], W [V, H], y [N] int.
    z = h W^T / T                     [N, V] logits (the "torch"/"triton" backends hold one tile at a time)
    m = max_j z_j,  s = sum_j exp(z_j - m),  lse = m + log s,  p = exp(z - lse),  t = z - lse = log p
    logp = (z_y - m) - log s          [N] fp32 (not z_y - lse: lse ~ |z| would cost digits)
    entropy = -sum_j p_j t_j = log s - sum_j exp(z_j - m) (z_j - m) / s          [N] fp32
Backward, for upstream gradients g_lp, g_H [N] (exact, so an entropy bonus works):
    dz_j = g_lp (1[j=y] - p_j) - g_H p_j (z_j - sum_i p_i z_i)
         = g_lp 1[j=y] + p_j (beta t_j + gamma),  beta = -g_H,  gamma = -(g_lp + g_H entropy)
    (as z_j - sum_i p_i z_i = t_j + entropy);  dh = dz W / T,  dW = dz^T h / T.
Rows whose label is `ignore_index` return 0 for both outputs and get zero gradient.

Saved for backward: h, W, y (references, no copies, so an FSDP2-unsharded or tied weight works as is) and per
row lse as an fp32 hi + lo pair and the entropy (fp32 [N] each); the logits are recomputed tile by tile.
FLOPs: forward 2NHV; backward 6NHV (recompute 2NHV, dh 2NHV, dW 2NHV), so 8NHV forward+backward
(a materializing implementation does 6NHV but holds several [N, V] tensors).

Backends (all share the math above; "naive" is the spec the others are tested against):
- "triton": the forward kernel streams V in tiles per block of rows (online max / sum-exp / sum e*(z - m),
  tl.dot with fp32 accumulation), split over V when there are few row blocks, with a tiny combine. The
  backward's Triton kernel recomputes logit tiles into a dz chunk of bounded size [N, Vc] in the storage dtype
  (dz never exists whole); cuBLAS then multiplies it by W_c into an fp32 dh accumulator and by h into dW_c
  (torch.addmm / torch.mm with out_dtype=float32, see _addmm_fp32). Runs on CUDA, and on CPU under
  TRITON_INTERPRET=1 (how the tests run it; triton 3.4, 3.5, 3.6 and 3.9 checked there).
- "torch": the same tiling with PyTorch ops on fp32 [rows, Vc] tiles, V chunks outer; the CPU default. Its own file,
  bupo/kernels/chunked.py, says how bf16 inputs are multiplied there (logits never rounded to bf16) and how it
  keeps denormals out of every tile.
- "naive": a plain PyTorch model's computation (logits = h @ W^T in the input dtype, then fp32 log-softmax).
- "auto": "triton" for CUDA tensors, "torch" otherwise.
"""
import functools
import math
import os
import types
import warnings

import torch

from bupo.kernels import chunked

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS/Windows laptops: the "torch" and "naive" backends need no triton
    triton = None
    tl = types.SimpleNamespace(constexpr=None)

BACKENDS = ("auto", "triton", "torch", "naive")
DZ_CHUNK_BYTES = 128 << 20  # "triton": bytes of the dz chunk [N, Vc] of the backward
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# --- Triton kernels ---------------------------------------------------------------------------------------
# 64-bit offsets (N x H and V x H pass 2^31 elements at real shapes): program ids go to int64 first, so row and
# column indices are int64, and each pointer takes its row/column offset first (`ptr + rows * stride + k`); an
# int argument >= 2^31 arrives as i64 anyway. tests/kernels checks this (test_triton_offsets_are_int64).
# Loop bounds (H, TILES_PER_SPLIT) are constexpr: triton <= 3.6's interpreter cannot `range()` over a runtime
# argument with NumPy >= 2.4.
@_jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if PRECISION == "upcast":  # the CPU interpreter mis-multiplies bf16; fp32 products of bf16/fp16 are exact
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@_jit
def _logits_tile(h_ptr, w_ptr, rows, cols, N, v_end, stride_h, stride_w, inv_t, H: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """z[rows, cols] = h[rows] . W[cols] / T in fp32; columns >= v_end are -inf (they must add no mass).
    rows, cols: int64."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        k = k0 + tl.arange(0, BLOCK_H)
        a = tl.load(h_ptr + rows[:, None] * stride_h + k[None, :], mask=(rows[:, None] < N) & (k[None, :] < H),
                    other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + k[:, None], mask=(cols[None, :] < v_end) & (k[:, None] < H),
                    other=0.0)
        acc = _dot(a, b, acc, PRECISION)
    return tl.where(cols[None, :] < v_end, acc * inv_t, float("-inf"))


@_jit
def _fwd_kernel(h_ptr, w_ptr, y_ptr, stats_ptr, N, V, stride_h, stride_w, inv_t, H: tl.constexpr,
                TILES_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                PRECISION: tl.constexpr):
    """Per (row block, V split): running max m, sum-exp s, sum e*(z - m) q and label logit zy -> stats[4, S, N]."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    num_s = tl.num_programs(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y = tl.load(y_ptr + rows, mask=rows < N, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    q = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    for i in range(TILES_PER_SPLIT):  # the first tile of every split is inside V (see _triton_forward)
        cols = (pid_s * TILES_PER_SPLIT + i) * BLOCK_V + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, stride_h, stride_w, inv_t,
                         H, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        t = z - m_new[:, None]
        e = tl.exp(t)  # padded columns: exp(-inf) = 0
        et = e * tl.where(cols[None, :] < V, t, 0.0)  # not e * t there: 0 * -inf = nan
        q = alpha * (q + s * tl.where(s > 0, m - m_new, 0.0)) + tl.sum(et, axis=1)  # first tile: m = -inf
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = stats_ptr + pid_s * N + rows
    mask = rows < N
    tl.store(out, m, mask=mask)
    tl.store(out + num_s * N, s, mask=mask)
    tl.store(out + 2 * num_s * N, q, mask=mask)
    tl.store(out + 3 * num_s * N, zy, mask=mask)


@_jit
def _dlogits_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, a_ptr, beta_ptr, gamma_ptr, dz_ptr, N, v0, v_end, stride_h,
                    stride_w, stride_dz, inv_t, H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """dz[:, cols - v0] = a 1[col=y] + p (beta t + gamma) for cols in [v0, v_end); a, beta, gamma [N] per row."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v0 + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, N, v_end, stride_h, stride_w, inv_t,
                     H, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    a = tl.load(a_ptr + rows, mask=row_mask, other=0.0)
    beta = tl.load(beta_ptr + rows, mask=row_mask, other=0.0)
    gamma = tl.load(gamma_ptr + rows, mask=row_mask, other=0.0)
    t = z - lse[:, None]
    dz = tl.exp(t) * (beta[:, None] * tl.where(cols[None, :] < v_end, t, 0.0) + gamma[:, None])
    dz += tl.where(cols[None, :] == y[:, None], a[:, None], 0.0)
    mask = row_mask[:, None] & (cols[None, :] < v_end)
    tl.store(dz_ptr + rows[:, None] * stride_dz + (cols[None, :] - v0), dz.to(dz_ptr.dtype.element_ty), mask=mask)


# --- Triton launchers -------------------------------------------------------------------------------------
def _blocks(device: torch.device) -> dict:
    if device.type == "cuda":  # H100-sized tiles; CPU/interpreter gets tiny ones (it runs them in numpy)
        return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
    return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16)


def _precision(dtype: torch.dtype) -> str:
    if _INTERPRET:
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs get true fp32 products, not TF32


def _triton_forward(h, w, y, inv_t: float, splits: int | None = None):
    """-> row max m, log sum exp(z - m), entropy, label logit zy: [N] fp32 each. `splits`: V splits per row block
    (default: enough programs to fill the GPU twice, rounded down to a power of two so that TILES_PER_SPLIT, a
    compile-time constant, takes at most ~9 values per vocabulary size)."""
    (N, H), V = h.shape, w.shape[0]
    cfg = _blocks(h.device)
    n_tiles, row_blocks = triton.cdiv(V, cfg["BLOCK_V"]), triton.cdiv(N, cfg["BLOCK_N"])
    if splits is None:
        sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 1
        splits = 1 << (max(1, 2 * sms // row_blocks).bit_length() - 1)
    per_split = triton.cdiv(n_tiles, min(splits, n_tiles))
    splits = triton.cdiv(n_tiles, per_split)  # now every split starts inside V
    stats = torch.empty(4, splits, N, device=h.device, dtype=torch.float32)  # m, s, q, zy
    _fwd_kernel[(row_blocks, splits)](h, w, y, stats, N, V, h.stride(0), w.stride(0), inv_t, H=H,
                                      TILES_PER_SPLIT=per_split, PRECISION=_precision(h.dtype), **cfg)
    m, s, q, zy = stats.unbind(0)
    m_max = m.amax(0)
    alpha = torch.exp(m - m_max)
    s_all = (alpha * s).sum(0)
    q_all = (alpha * (q + s * (m - m_max))).sum(0)
    log_s = torch.log(s_all)
    return m_max, log_s, log_s - q_all / s_all, zy.sum(0)


# The backward's GEMMs run in cuBLAS with fp32 sums. 16-bit operands with an fp32 result need `out_dtype` (CUDA,
# torch >= 2.8, our lowest); addmm with an fp32 C needs torch >= 2.10 (before, C must be 16-bit: we add an fp32
# product). CPU (the interpreter tests) upcasts: exact products, same sums. fp32 GEMMs follow allow_tf32 (off by
# default).
_ADDMM_FP32_C = torch.torch_version.TorchVersion(torch.__version__) >= (2, 10)


def _lowp_gemm_on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def _addmm_fp32(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor | None) -> None:
    """c += a @ b with c fp32 and a, b in the storage dtype; `scratch` is an fp32 tensor shaped like c."""
    if a.dtype == c.dtype:
        c.addmm_(a, b)
    elif _lowp_gemm_on_cuda(a) and _ADDMM_FP32_C:
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
    elif _lowp_gemm_on_cuda(a):
        c.add_(torch.mm(a, b, out_dtype=torch.float32, out=scratch))
    else:
        c.addmm_(a.float(), b.float())


def _mm_rounded_once(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor | None) -> None:
    """out = a @ b, summed in fp32 and rounded once to out's dtype; `scratch` is an fp32 tensor shaped like out."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif _lowp_gemm_on_cuda(a):  # not a 16-bit cuBLAS result: that may reduce split-K partials in 16 bit
        out.copy_(torch.mm(a, b, out_dtype=torch.float32, out=scratch))
    else:
        out.copy_(a.float() @ b.float())


def _triton_backward(h, w, y, lse, coef, inv_t: float, chunk_bytes: int, need: tuple[bool, bool]):
    """coef [3, N] = (a, beta, gamma) already divided by T. -> dh [N, H], dW [V, H] in the input dtype (or None).

    Per chunk of Vc vocabulary rows: the Triton kernel writes dz [N, Vc] in the storage dtype (recomputing the
    logits), then cuBLAS does dh += dz W_c into an fp32 [N, H] accumulator and dW_c = dz^T h (fp32 sums, one
    rounding). Memory beyond the outputs: dz (<= chunk_bytes), dh fp32, and fp32 scratch of [Vc, H] (and of
    [N, H] on torch 2.8/2.9)."""
    (N, H), V = h.shape, w.shape[0]
    cfg = _blocks(h.device)
    bv = cfg["BLOCK_V"]
    vc = min(triton.cdiv(V, bv) * bv, max(bv, chunk_bytes // (N * h.element_size()) // bv * bv))
    dz_buf = torch.empty(N * vc, device=h.device, dtype=h.dtype)  # dz chunks [N, Vc], the only logits-sized buffer
    lowp = _lowp_gemm_on_cuda(h)  # 16-bit operands, fp32 results: needs fp32 scratch
    dh = torch.zeros(N, H, device=h.device, dtype=torch.float32) if need[0] else None
    dh_scratch = torch.empty_like(dh) if need[0] and lowp and not _ADDMM_FP32_C else None  # [N, H]
    dw = torch.empty_like(w) if need[1] else None
    dw_scratch = torch.empty(vc, H, device=h.device, dtype=torch.float32) if need[1] and lowp else None  # [Vc, H]
    a, beta, gamma = coef.unbind(0)
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        dz = dz_buf[: N * (v1 - v0)].view(N, v1 - v0)  # contiguous, also for the last, shorter chunk
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(v1 - v0, bv))
        _dlogits_kernel[grid](h, w, y, lse, a, beta, gamma, dz, N, v0, v1, h.stride(0), w.stride(0), dz.stride(0),
                              inv_t, H=H, PRECISION=_precision(h.dtype), **cfg)
        if dh is not None:  # dh += dz W_c
            _addmm_fp32(dh, dz, w[v0:v1], dh_scratch)
        if dw is not None:  # dW_c = dz^T h
            _mm_rounded_once(dw[v0:v1], dz.T, h, None if dw_scratch is None else dw_scratch[: v1 - v0])
    return None if dh is None else dh.to(h.dtype), dw


# --- autograd ---------------------------------------------------------------------------------------------
def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a + b as hi + lo exactly (Knuth): lse = m + log_s is ~|z| large, and its rounding error (6e-5 at
    |z| ~ 500 in fp32) would otherwise scale every p in backward."""
    hi = a + b
    bb = hi - a
    return hi, (a - (hi - bb)) + (b - bb)


class _LinearLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, y, valid, inv_t: float, backend: str, chunk_bytes: int):
        fwd = _triton_forward if backend == "triton" else functools.partial(chunked.forward, chunk_bytes=chunk_bytes)
        m, log_s, ent, zy = fwd(h, w, y, inv_t)
        out = torch.float64 if h.dtype == torch.float64 else torch.float32
        logp = torch.where(valid, (zy - m) - log_s, 0.0).to(out)  # not zy - lse: lse ~ |z| loses digits
        ent = torch.where(valid, ent, 0.0).to(out)
        lse, lse_lo = _two_sum(m, log_s)
        ctx.save_for_backward(h, w, y, valid, lse, lse_lo, ent)
        ctx.inv_t, ctx.backend, ctx.chunk_bytes = inv_t, backend, chunk_bytes
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, y, valid, lse, lse_lo, ent = ctx.saved_tensors
        g_lp, g_ent = torch.where(valid, g_lp, 0.0).to(lse.dtype), torch.where(valid, g_ent, 0.0).to(lse.dtype)
        # dz = a 1[j=y] + p (beta t + gamma) with t = z - lse - lse_lo; the tiles compute t' = z - lse, so
        # exp(-lse_lo) and -beta * lse_lo are folded into the per-row coefficients instead.
        c = torch.exp(-lse_lo)
        coef = torch.stack([g_lp, -c * g_ent, -c * (g_lp + g_ent * (ent - lse_lo))])  # [3, N]: a, beta, gamma
        need = ctx.needs_input_grad[:2]
        if ctx.backend == "triton":
            dh, dw = _triton_backward(h, w, y, lse, coef * ctx.inv_t, ctx.inv_t, DZ_CHUNK_BYTES, need)
        else:
            dh, dw = chunked.backward(h, w, y, lse, coef, ctx.inv_t, ctx.chunk_bytes, need)
        return dh, dw, None, None, None, None, None


# --- public function --------------------------------------------------------------------------------------
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _resolve_backend(hidden: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; use one of {', '.join(map(repr, BACKENDS))}")
    if backend == "auto" and hidden.is_cuda and triton is None:
        _warn_once("triton is not installed: linear_logprob_entropy falls back to the chunked torch backend on CUDA")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and triton is not None and hidden.dtype != torch.float64 else "torch"
    if backend == "triton":
        if triton is None:
            raise ValueError("backend='triton' needs the triton package, which is not installed; use 'torch'")
        if not hidden.is_cuda and not _INTERPRET:
            raise ValueError(f"backend='triton' needs CUDA tensors (hidden is on {hidden.device}); on CPU set "
                             "TRITON_INTERPRET=1 before triton is imported, or use backend='torch'")
        if hidden.dtype == torch.float64:
            raise ValueError("backend='triton' supports float16/bfloat16/float32 inputs, got float64")
    return "torch" if backend == "triton" and hidden.shape[0] == 0 else backend  # nothing to launch


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H] with H={hidden.shape[1]} (from hidden), got shape "
                         f"{tuple(weight.shape)}")
    if hidden.dtype not in _FLOATS:
        raise ValueError(f"hidden has dtype {hidden.dtype}; use one of {_FLOATS}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_labels(labels: torch.Tensor, N: int, V: int, ignore_index: int, device: torch.device) -> None:
    if labels.shape != (N,):
        raise ValueError(f"labels must be [N] with N={N} (from hidden), got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but hidden is on {device}")
    if not labels.is_cuda and not torch.compiler.is_compiling():  # on CUDA it would sync the stream
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bad.any():
            raise ValueError(f"labels must be in [0, {V}) or ignore_index={ignore_index}, got "
                             f"{labels[bad][0].item()}")


def linear_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                           temperature: float = 1.0, ignore_index: int = -100,
                           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight.T / T)[labels] and the entropy of that softmax, per row.

    hidden [N, H], weight [V, H] (same float dtype), labels [N] int -> (logp [N] fp32, entropy [N] fp32)
    (fp64 for fp64 inputs). Differentiable w.r.t. hidden and weight through both outputs; gradients come
    back in the input dtype. Rows labelled `ignore_index` give 0 and get no gradient. See the module
    docstring for the math and the backends.
    """
    _check_inputs(hidden, weight, temperature)
    _check_labels(labels, hidden.shape[0], weight.shape[0], ignore_index, hidden.device)
    backend = _resolve_backend(hidden, backend)
    if backend == "naive":
        return linear_logprob_entropy_reference(hidden, weight, labels, temperature=temperature,
                                                ignore_index=ignore_index)
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0).long()
    if backend == "triton":
        hidden, weight = hidden.contiguous(), weight.contiguous()
    return _LinearLogprobEntropy.apply(hidden, weight, y, valid, 1.0 / temperature, backend, chunked.CHUNK_BYTES)


# --- reference (the spec) ---------------------------------------------------------------------------------
def linear_logprob_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                     temperature: float = 1.0,
                                     ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain PyTorch computation: materializes [N, V] logits (in the input dtype, like a model's lm_head
    would), then log-softmax in fp32 (fp64 for fp64 inputs). Autograd gives the gradients."""
    z = hidden @ weight.T  # [N, V]
    z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
    logq = torch.log_softmax(z, dim=-1)  # [N, V]
    valid = labels != ignore_index
    logp = logq.gather(1, torch.where(valid, labels, 0).long()[:, None])[:, 0]
    ent = -(logq.exp() * logq).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)
