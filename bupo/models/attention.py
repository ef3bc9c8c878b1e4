"""Attention backends of the decoder (bupo/models/decoder.py), plus the KV cache of the built-in sampler.

Legend: B batch, T time (tokens per row), N total packed tokens, S cache slots, nh query heads,
nkv key/value heads (GQA: nh % nkv == 0), hd head dim.

Backends for causal self-attention (training / prefill), picked per call:
  1. flash-attn (varlen for packed input) on CUDA in fp16/bf16 when the package is installed;
  2. torch.nn.attention.varlen.varlen_attn on CUDA in fp16/bf16 for packed input;
  3. SDPA, once per packed sequence (or once for a [B, T] batch). This is the designed CPU backend;
     on CUDA it is a fallback and warns once.
Masked attention (the built-in sampler's prefill and decode: queries against a KV cache with a boolean mask) uses SDPA,
except for 16-bit tensors on a CPU while the fp32 values it holds stay within GROUPED_MAX_ELEMENTS: then plain fp32
products per K/V head (`_grouped_fp32`), because torch's CPU SDPA kernel is several times slower in bf16 than in fp32
at q_len 1.
"""

import functools
import importlib.util
import inspect
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


@functools.cache
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _varlen_attn():
    """torch's own varlen flash attention and the causal/GQA keywords this torch version takes, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, kw, "enable_gqa" in params


class Captured:
    """Where a decoder layer writes its modular quantities (`out.update(layer_in=..., ...)`) for `capture`.

    Deliberately not a dict, list, tuple or dataclass: FSDP2 rebuilds forward arguments of those kinds when it casts
    inputs to its compute dtype, so a dict argument would be filled in a copy and come back empty to the caller."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def update(self, **tensors: torch.Tensor) -> None:
        self.values.update(tensors)


@dataclass
class Packing:
    """Boundaries of the sequences packed into one row: cu_seqlens int32 [S+1], on the device and as ints."""

    cu_seqlens: torch.Tensor
    bounds: list[int]
    max_seqlen: int


def packing(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> Packing:
    """Validate cu_seqlens against a [1, total] input (one host sync per forward, not per layer)."""
    bounds = [int(b) for b in cu_seqlens.tolist()]
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or min(lens) <= 0:
        raise ValueError(f"cu_seqlens must rise strictly from 0 to {total} (the packed length), got {bounds}")
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    return Packing(cu, bounds, max(lens))


def packed_positions(p: Packing) -> torch.Tensor:
    """Positions that restart at 0 for every packed sequence: [1, N] int64."""
    lens = p.cu_seqlens.diff().long()  # [S]
    starts = p.cu_seqlens[:-1].long().repeat_interleave(lens)  # [N]
    return (torch.arange(p.bounds[-1], device=p.cu_seqlens.device) - starts)[None]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """SDPA on [B, T, nh, hd] layouts; GQA by SDPA's enable_gqa (K/V are never expanded in memory)."""
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=k.shape[2] != q.shape[2], **kw
    )
    return o.transpose(1, 2)  # [B, T, nh, hd]


def _sdpa_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Packing) -> torch.Tensor:
    outs = [_sdpa(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True) for s, e in zip(p.bounds[:-1], p.bounds[1:])]
    return torch.cat(outs, dim=1)


def _cuda_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Packing) -> torch.Tensor:
    fn, kw, has_gqa = _varlen_attn()
    if has_gqa:
        kw = {**kw, "enable_gqa": True}
    elif k.shape[2] != q.shape[2]:
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    o = fn(q[0], k[0], v[0], p.cu_seqlens, p.cu_seqlens, p.max_seqlen, p.max_seqlen, **kw)
    return o[None]  # [1, N, nh, hd]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Packing | None = None) -> torch.Tensor:
    """Causal self-attention. q [B, T, nh, hd], k/v [B, T, nkv, hd] -> [B, T, nh, hd].

    With `p` the input is packed (B == 1) and no query attends across a sequence boundary.
    Softmax scale is 1/sqrt(hd) everywhere.
    """
    if q.is_cuda and q.dtype in _HALF:
        if _has_flash_attn():
            from flash_attn import flash_attn_func, flash_attn_varlen_func

            if p is None:
                return flash_attn_func(q, k, v, causal=True)
            o = flash_attn_varlen_func(
                q[0], k[0], v[0], p.cu_seqlens, p.cu_seqlens, p.max_seqlen, p.max_seqlen, causal=True
            )
            return o[None]
        if p is not None and _varlen_attn() is not None:
            _warn_once("flash-attn is not installed: attention falls back to torch.nn.attention.varlen.varlen_attn")
            return _cuda_varlen(q, k, v, p)
    if q.is_cuda:
        why = "flash kernels need fp16/bf16" if q.dtype not in _HALF else "flash-attn is not installed"
        _warn_once(f"attention on CUDA falls back to SDPA, one call per packed sequence ({why})")
    if p is None:
        return _sdpa(q, k, v, is_causal=True)
    return _sdpa_packed(q, k, v, p)


GROUPED_MAX_ELEMENTS = 1 << 24  # fp32 elements (64 MiB) that _grouped_fp32 may hold: scores and upcast K/V


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, t, nh, hd] against k/v [B, S, nkv, hd]; mask [B, t, S] bool, True = may attend."""
    (B, t, nh, _), (S, nkv, hd) = q.shape, k.shape[1:]
    if q.device.type == "cpu" and q.dtype in _HALF and B * S * (nh * t + 2 * nkv * hd) <= GROUPED_MAX_ELEMENTS:
        return _grouped_fp32(q, k, v, mask)
    return _sdpa(q, k, v, attn_mask=mask[:, None])


def _grouped_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_attention of 16-bit CPU tensors in fp32, by plain products per K/V head. For the sampler's decode
    steps: torch's CPU SDPA kernel is several times slower in bf16 than in fp32 at q_len 1 (4.6x measured at
    SmolLM2's shapes, 64 rows x ~100 keys), and this is faster than either. It holds the scores [B, nh, t, S] and
    K/V in fp32, so it is used only while those stay within GROUPED_MAX_ELEMENTS (a long prompt's prefill goes to
    SDPA, which is faster there and never holds the scores). Products of the 16-bit values are exact in fp32, the
    softmax is fp32, and the output is rounded once, to q's dtype."""
    B, t, nh, hd = q.shape
    S, nkv = k.shape[1], k.shape[2]
    g = nh // nkv  # query heads per K/V head: head h reads K/V head h // g, as SDPA's enable_gqa
    qf = q.float().view(B, t, nkv, g, hd).permute(0, 2, 3, 1, 4).reshape(B, nkv, g * t, hd)  # [B, nkv, g t, hd]
    # K and V upcast straight into the layouts the products read: one copy each (upcasting first, then letting the
    # product make the permuted tensor contiguous, copied them twice and took ~2x as long at decode shapes)
    kt = torch.empty(B, nkv, hd, S, dtype=torch.float32, device=k.device).copy_(k.permute(0, 2, 3, 1))  # [B,nkv,hd,S]
    vf = torch.empty(B, nkv, S, hd, dtype=torch.float32, device=v.device).copy_(v.transpose(1, 2))  # [B, nkv, S, hd]
    scores = qf @ kt * hd**-0.5  # [B, nkv, g t, S]
    scores = scores.view(B, nkv, g, t, S).masked_fill(~mask[:, None, None], -math.inf).softmax(-1)
    o = scores.view(B, nkv, g * t, S) @ vf  # [B, nkv, g t, hd]
    return o.view(B, nkv, g, t, hd).permute(0, 3, 1, 2, 4).reshape(B, t, nh, hd).to(q.dtype)


def decode_mask(key_mask: torch.Tensor, start: int, t: int) -> torch.Tensor:
    """[B, t, start+t] bool: key slot j is visible to new token i iff key_mask[b, j] and j <= start + i.

    A token always sees its own slot, so rows of pad tokens stay finite (a fully masked row gives NaN,
    which would then leak through the pad slots' cached K/V as 0 * NaN).
    """
    S = start + t
    if key_mask.shape[1] < S:
        raise ValueError(f"key_mask needs start + t = {S} columns, got shape {tuple(key_mask.shape)}")
    key_mask = key_mask[:, :S]  # a longer (e.g. full-cache) mask is fine: slots >= start+t are never read
    j = torch.arange(S, device=key_mask.device)  # [S]
    i = start + torch.arange(t, device=key_mask.device)  # [t]
    causal = j[None, :] <= i[:, None]  # [t, S]
    own = j[None, :] == i[:, None]  # [t, S]
    return (key_mask.bool()[:, None, :] & causal[None]) | own[None]


@dataclass
class AttnArgs:
    """What every decoder layer's attention needs besides its input: RoPE tables [B, T, hd] and either a
    packing (training / prefill; None = one causal sequence per row) or a KV cache step (decode)."""

    cos: torch.Tensor
    sin: torch.Tensor
    packing: Packing | None = None
    cache: "KVCache | None" = None
    start: int = 0  # first cache slot written by this step
    mask: torch.Tensor | None = None  # [B, t, start+t] bool, from decode_mask


@dataclass
class KVCache:
    """Per-layer K/V buffers [B, S_max, nkv, hd]; slot s of row b holds the token written at position s."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def empty(
        cls, num_layers: int, batch_size: int, max_len: int, nkv: int, hd: int, dtype: torch.dtype, device
    ) -> "KVCache":
        shape = (batch_size, max_len, nkv, hd)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(k, v)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, t, nkv, hd] to slots start..start+t-1; return views of slots 0..start+t-1."""
        end = start + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: writing slots up to {end} into a cache of max_len {self.max_len}")
        self.k[layer][:, start:end] = k
        self.v[layer][:, start:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]


__all__ = [
    "AttnArgs",
    "KVCache",
    "Packing",
    "causal_attention",
    "decode_mask",
    "masked_attention",
    "packed_positions",
    "packing",
]
