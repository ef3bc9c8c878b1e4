"""The "torch" backend of linear_logprob_entropy (its docstring has the math): the CPU default, PyTorch ops on
[rows, Vc] logits tiles of at most CHUNK_BYTES, V chunks outer, so W is read once per pass.

    m, log_s, entropy, zy = forward(h, W, y, 1 / T)                 # online max / sum-exp / sum e (z - m)
    dh, dW = backward(h, W, y, lse, coef, 1 / T, chunk_bytes, need)   # recompute, dz, two products per tile

Tiles are fp32 (fp64 for fp64 inputs). bf16 inputs on a CPU with bf16 support: the logit products (forward and the
backward's recompute) take the bf16 values upcast to fp32 under oneDNN's bf16 math mode (bupo.kernels.products:
exact products, fp32 accumulation and result, so logits keep fp32 accuracy; at fp32 speed where oneDNN keeps its
fp32 kernel, as on the CI machine); the backward's dz is rounded to bf16 once per tile, as the Triton backward's dz
chunk is, for its two products, which run as plain bf16 products on the bf16 units (fp32 accumulation, each tile's
part rounded once to bf16 and summed in fp32).
Denormals: CPU GEMMs on denormal floats ran ~200x slower here, and torch.set_flush_denormal only reaches the calling
thread (not the OpenMP workers), so no global state is touched; instead log-probs below -FLUSH_BELOW are clamped
(adds < V exp(-50) relative mass) and dz is normalized per row, so no tile holds a denormal.
Legend: N rows, H hidden size, V vocabulary, Vc columns of a tile, T temperature.
"""
import math

import torch

from bupo.kernels.products import bf16_units, fp32_products_in_bf16

CHUNK_BYTES = 64 << 20  # bytes of one logits tile (two are live); fewer, larger ops run faster on CPU
TILE_COLS = 8192  # vocabulary columns per tile
FLUSH_BELOW = 50.0  # log-probs below -FLUSH_BELOW are clamped, keeping every tile free of denormals


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tiles(N: int, V: int, chunk_bytes: int) -> tuple[int, int]:
    """(rows, cols) of a logits tile, rows * cols * 4 <= chunk_bytes. Wide tiles keep the GEMMs efficient."""
    cols = min(V, TILE_COLS, max(1, chunk_bytes // 4))
    return max(1, min(N, chunk_bytes // (4 * cols))), cols


def tile(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view into a flat, reused buffer (no fresh pages per tile)."""
    return buf[: rows * cols].view(rows, cols)


def forward(h, w, y: torch.Tensor | None, inv_t: float, chunk_bytes: int | None = None):
    """h [N, H], W [V, H], y [N] or None, inv_t = 1/T -> (m, log_s, entropy, zy) [N] each in the compute dtype
    (fp32; fp64 for fp64 inputs), as the Triton forward returns them; zy (the label logits) is None without y.
    W is read once."""
    cd, dev = _compute_dtype(h.dtype), h.device
    N, V = h.shape[0], w.shape[0]
    bf16 = bf16_units(h)  # then the products see h itself (bf16 values) and 1/T scales each tile after
    hs = h.to(cd) * inv_t  # [N, H]
    hp, tile_scale = (h.to(cd), inv_t) if bf16 else (hs, 1.0)  # [N, H] product input
    m = torch.full((N,), -math.inf, dtype=cd, device=dev)
    s, q = torch.zeros(N, dtype=cd, device=dev), torch.zeros(N, dtype=cd, device=dev)
    rows, cols = tiles(N, V, chunk_bytes or CHUNK_BYTES)
    buf_t, buf_e = torch.empty(2, rows * cols, dtype=cd, device=dev)
    buf_w = None if w.dtype == cd else torch.empty(cols * w.shape[1], dtype=cd, device=dev)
    with fp32_products_in_bf16(bf16):  # the matmul setting once per pass, not per tile
        for v0 in range(0, V, cols):
            wc = _upcast(w[v0: v0 + cols], buf_w)  # [Vc, H]
            for r0 in range(0, N, rows):
                r = slice(r0, r0 + rows)
                t = torch.mm(hp[r], wc.T, out=tile(buf_t, hp[r].shape[0], wc.shape[0]))  # [rows, Vc] logits
                if tile_scale != 1.0:
                    t.mul_(tile_scale)
                m_new = torch.maximum(m[r], t.amax(1))
                q_old = q[r] + s[r] * torch.where(s[r] > 0, m[r] - m_new, 0.0)  # re-centred on m_new
                alpha = torch.exp(m[r] - m_new)
                t.sub_(m_new[:, None]).clamp_(min=-FLUSH_BELOW)
                e = torch.exp(t, out=tile(buf_e, *t.shape))  # [rows, Vc]
                s[r] = alpha * s[r] + e.sum(1)
                q[r] = alpha * q_old + e.mul_(t).sum(1)
                m[r] = m_new
    zy = None if y is None else torch.linalg.vecdot(hs, w[y].to(cd))  # label logits, one [N, H] gather
    log_s = torch.log(s)
    return m, log_s, log_s - q / s, zy


def backward(h, w, y, lse, coef, inv_t: float, chunk_bytes: int, need: tuple[bool, bool]):
    """coef [3, N] = (a, beta, gamma), not divided by T. -> dh [N, H], dW [V, H] in the input dtype (or None)."""
    cd, dev = _compute_dtype(h.dtype), h.device
    (N, H), V = h.shape, w.shape[0]
    # Row scale r makes dz / r O(1): tiny upstream gradients cannot push the tiles into denormals.
    r = coef.abs().amax(0).to(cd)
    r = torch.where(r > 0, r, 1.0)
    a, beta, gamma = (coef.to(cd) / r).unbind(0)
    bf16 = bf16_units(h)  # then the products see h itself (bf16 values); the scales move to the tiles
    hs = h.to(cd) * inv_t  # [N, H] recompute input
    hp = h.to(cd) if bf16 else hs  # [N, H] product input of the recompute and of dW
    hr = None if bf16 else hs * r[:, None]  # [N, H] dW input
    dh = torch.zeros(N, H, dtype=cd, device=dev) if need[0] else None
    dw = (torch.empty if N else torch.zeros)(V, H, dtype=w.dtype, device=dev) if need[1] else None
    rows, cols = tiles(N, V, chunk_bytes)
    buf_t, buf_p = torch.empty(2, rows * cols, dtype=cd, device=dev)
    buf_w = None if w.dtype == cd else torch.empty(cols * H, dtype=cd, device=dev)
    buf_dw = None if dw is None or dw.dtype == cd else torch.empty(cols * H, dtype=cd, device=dev)
    bufs16 = _Bf16Buffers(rows, cols, H, dev) if bf16 else None
    with fp32_products_in_bf16(bf16):  # the matmul setting once per pass, not per tile
        for v0 in range(0, V, cols):
            wc = _upcast(w[v0: v0 + cols], buf_w)  # [Vc, H]
            vc = wc.shape[0]
            dwc = None if dw is None else (dw[v0: v0 + vc] if dw.dtype == cd else tile(buf_dw, vc, H))
            # label term a 1[j=y]: one element per row, added to the tile at (row, y - v0) when y is in this chunk
            at_y = torch.where((y >= v0) & (y < v0 + vc), a, 0.0)
            col_y = (y - v0).clamp(0, vc - 1)
            for r0 in range(0, N, rows):
                sl = slice(r0, r0 + rows)
                t = torch.mm(hp[sl], wc.T, out=tile(buf_t, hp[sl].shape[0], vc))  # [rows, Vc] logits
                if bf16 and inv_t != 1.0:
                    t.mul_(inv_t)
                t.sub_(lse[sl, None])  # log p
                p = torch.clamp(t, min=-FLUSH_BELOW, out=tile(buf_p, *t.shape)).exp_()  # [rows, Vc]
                t.mul_(beta[sl, None]).add_(gamma[sl, None]).mul_(p)  # dz / r without the label term
                flat = torch.arange(t.shape[0], device=dev) * vc + col_y[sl]
                t.view(-1).index_add_(0, flat, at_y[sl])  # dz / r
                if bf16:  # dz rounded to bf16 (as the Triton backward's dz chunk): bare bf16 products, fp32 sums
                    _bf16_grad_products(t, w[v0: v0 + vc], h[sl], (r[sl] * inv_t)[:, None], dh, dwc, sl, r0 == 0,
                                        bufs16)
                    continue
                if dh is not None:
                    dh[sl].addmm_(t, wc)
                if dwc is not None and r0 == 0:
                    torch.mm(t.T, hr[sl], out=dwc)
                elif dwc is not None:
                    dwc.addmm_(t.T, hr[sl])
            if dwc is not None and dw.dtype != cd:
                dw[v0: v0 + vc].copy_(dwc)
    if dh is not None:
        dh = dh.mul_(r[:, None] * inv_t).to(h.dtype)
    return dh, dw


class _Bf16Buffers:
    """Reused bf16 buffers of the backward's tiles: dz [rows, Vc] and the products' results. Fresh tensors of this
    size cost a page fault per 4 KiB on every tile (a fresh [8192, 512] fp32 upcast took 9 ms here, a reused one
    0.5 ms)."""

    def __init__(self, rows: int, cols: int, H: int, dev: torch.device):
        self.dz, self.dw = torch.empty(2, max(rows, H) * cols, dtype=torch.bfloat16, device=dev)
        self.dh = torch.empty(rows * H, dtype=torch.bfloat16, device=dev)


def _upcast(chunk: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """chunk in the compute dtype, copied into the reused flat `buf` (None: chunk is in it already)."""
    return chunk if buf is None else buf[: chunk.numel()].view(chunk.shape).copy_(chunk)


def _bf16_grad_products(t, wc, h, scale, dh, dwc, sl: slice, first: bool, bufs: _Bf16Buffers) -> None:
    """The backward's two products for one tile on bf16 units, from dz rounded to bf16 once: dh[sl] += (dz / r) W_c
    and dW_c (+)= dz^T h. t [rows, Vc] fp32 holds dz / r (and dz after this); wc [Vc, H], h [rows, H] bf16; scale
    [rows, 1] = r / T. bf16 x bf16 products accumulate in fp32 on the CPU's units and return bf16: each tile's part is
    rounded once to bf16 and summed in fp32 (dh, dwc)."""
    rows, vc, H = t.shape[0], t.shape[1], wc.shape[1]
    dz = tile(bufs.dz, rows, vc)
    if dh is not None:
        dh[sl].add_(torch.mm(dz.copy_(t), wc, out=tile(bufs.dh, rows, H)))
    if dwc is not None:
        part = torch.mm(dz.copy_(t.mul_(scale)).T, h, out=tile(bufs.dw, vc, H))  # [Vc, H]: dz^T h
        if first:
            dwc.copy_(part)
        else:
            dwc.add_(part)


__all__ = ["CHUNK_BYTES", "TILE_COLS", "FLUSH_BELOW", "tiles", "tile", "forward", "backward"]
