"""The Llama-family decoder, written out by hand: Llama 3.x (Llama-3.2/3.1, OctoThinker, SmolLM2), Qwen2/2.5 and
Qwen3 are one module with flags. Module names mirror the HF checkpoints, so state dicts load and save as they are.

What the families change, all decided by `model_type` and the config.json fields:
  qwen3  per-head RMSNorm of q and k before RoPE (`q_norm`, `k_norm`); head_dim given explicitly (nh * hd != H)
  qwen2  bias on q/k/v (never on o), whatever attention_bias says
  llama  bias on q/k/v/o and gate/up/down as attention_bias / mlp_bias say
RoPE may be "llama3"-scaled (rope_scaling) in any family; what a config.json leaves out means per family (OMITTED).

Legend: B batch, T time, N packed tokens, H hidden, V vocab, L layers, nh query heads, nkv key/value heads,
hd head dim, I MLP width.
"""

import copy
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import (
    AttnArgs,
    Captured,
    KVCache,
    causal_attention,
    decode_mask,
    masked_attention,
    packed_positions,
    packing,
)

CAPTURE_KEYS = ("layer_in", "attn_in", "attn_out", "ffn_in", "ffn_out", "layer_out")  # what capture() returns
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_WRITTEN_BY_SAVE = {"architectures", "model_type", "torch_dtype", "dtype", "rope_parameters", "transformers_version"}
_QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                 num_attention_heads=32, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                 rope_scaling=None)
# What each family's config.json means by a key it leaves out, where that is not DecoderConfig's default
# (Llama-3.2-3B); head_dim None: hidden_size // num_attention_heads, as transformers derives it.
OMITTED = {
    "llama": dict(rope_theta=10_000.0, rope_scaling=None, head_dim=None),
    "qwen2": dict(_QWEN3_4B, head_dim=None),
    "qwen3": dict(_QWEN3_4B, head_dim=128),
}


_LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings")


@dataclass
class DecoderConfig:
    """HF config.json fields; defaults are Llama-3.2-3B (the OctoThinker-3B architecture)."""

    vocab_size: int = 128256
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 28
    num_attention_heads: int = 24
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    )
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q/k/v/o (Qwen2: q/k/v always, o never)
    mlp_bias: bool = False  # bias on gate/up/down
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"  # "qwen2", "qwen3": the flags below
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, written back unchanged

    @property
    def qk_norm(self) -> bool:
        """Qwen3: RMSNorm over each head's hd features of q and k, before RoPE."""
        return self.model_type == "qwen3"

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @classmethod
    def from_hf_dict(cls, d: dict) -> "DecoderConfig":
        names = {f.name for f in fields(cls)} - {"extra"}
        mt = d.get("model_type") or cls.model_type
        if mt not in OMITTED:
            raise ValueError(f"model_type {mt!r} is not one of {sorted(OMITTED)}")
        kw = {**OMITTED[mt], **{k: v for k, v in d.items() if k in names and v is not None}}
        kw["rope_theta"], kw["rope_scaling"] = _rope(kw["rope_theta"], d.get("rope_parameters") or kw["rope_scaling"])
        kw.setdefault("num_attention_heads", cls.num_attention_heads)
        kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
        if kw["head_dim"] is None:  # derived only from valid fields; validate() names a bad one
            h, n = kw.get("hidden_size", cls.hidden_size), kw["num_attention_heads"]
            kw["head_dim"] = h // n if _positive_int(h) and _positive_int(n) else None
        kw.setdefault("tie_word_embeddings", False)  # what transformers assumes when config.json omits it
        extra = {k: v for k, v in d.items() if k not in names and k not in _WRITTEN_BY_SAVE}
        cfg = cls(**kw, extra=extra)
        cfg.validate()
        return cfg

    def to_hf_dict(self) -> dict:
        d = {"architectures": [ARCHITECTURES[self.model_type]], **self.extra}
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        return copy.deepcopy(d)  # callers (transformers among them) may edit nested dicts in place

    def validate(self) -> None:
        """ValueError naming the first field that is unsupported, of the wrong type or out of range."""
        for name in _POSITIVE_INTS:
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not _positive_number(getattr(self, name)):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {sorted(ARCHITECTURES)}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3' or none)")
        for name in _LLAMA3_ROPE if kind == "llama3" else ():
            v = self.rope_scaling.get(name)  # the original length may be left out (then max_position_embeddings)
            if not _positive_number(v) and not (v is None and name == "original_max_position_embeddings"):
                raise ValueError(f"rope_scaling.{name} must be a positive number, got {v!r}")
        if self.mlp_bias and self.model_type != "llama":
            raise ValueError(f"mlp_bias=True is not supported for {self.model_type} (its MLPs have no bias)")
        if self.extra.get("use_sliding_window", False) not in (None, False):
            raise ValueError(f"use_sliding_window={self.extra['use_sliding_window']!r} is not supported (only false; "
                             "released Qwen checkpoints leave it off)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")


def _rope(theta: float, scaling: dict | None) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None for plain RoPE) from either layout: transformers < 5 writes rope_theta and
    rope_scaling (type or rope_type), >= 5 one rope_parameters dict holding both."""
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling / rope_parameters must be an object, got {scaling!r}")
    sc = dict(scaling or {})
    theta = sc.pop("rope_theta", theta)  # theta lives at the top level
    sc.setdefault("rope_type", sc.pop("type", "default"))
    return theta, (sc if sc["rope_type"] != "default" else None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused_norm = None  # (x, weight, eps) -> y; set by bupo.models.liger.use_liger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_norm is not None:
            return self.fused_norm(x, self.weight, self.eps)
        # normalize in fp32, cast back, then scale: the order of the HF checkpoints' reference code
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE with half-split pairs (i, i + hd/2), optionally llama3-scaled. `inv_freq` is a non-persistent fp32
    buffer that is recomputed whenever the module is moved, cast or materialized (`to`, `to_empty`), so a meta
    build or a bf16 cast never leaves uninitialized or rounded frequencies."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.theta, self.hd, self.scaling = cfg.rope_theta, cfg.head_dim, cfg.rope_scaling
        self.max_pos = cfg.max_position_embeddings
        self.register_buffer("inv_freq", self.compute_inv_freq(None), persistent=False)

    def compute_inv_freq(self, device: torch.device | str | None) -> torch.Tensor:
        exps = torch.arange(0, self.hd, 2, dtype=torch.int64, device=device).float() / self.hd
        inv = 1.0 / (self.theta**exps)  # [hd/2] fp32
        return inv if not self.scaling else llama3_scale(inv, self.scaling, self.max_pos)

    def reset(self, device: torch.device | str) -> None:
        self.inv_freq = self.compute_inv_freq(device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if not self.inv_freq.is_meta:
            self.reset(self.inv_freq.device)
        return self

    def forward(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos[..., None].float() * self.inv_freq  # [B, T, hd/2] fp32
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def llama3_scale(inv: torch.Tensor, sc: dict, max_pos: int) -> torch.Tensor:
    """Llama 3.1 context extension: wavelengths longer than old_len / low_freq_factor are stretched by `factor`,
    shorter than old_len / high_freq_factor kept, and the band between blends the two linearly in old_len / wavelen."""
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc.get("original_max_position_embeddings", max_pos)
    wavelen = 2 * math.pi / inv
    stretched = torch.where(wavelen > old_len / lo, inv / factor, inv)
    w = (old_len / wavelen - lo) / (hi - lo)  # 0 at the long-wavelength edge of the band, 1 at the short one
    blended = (1 - w) * stretched / factor + w * stretched
    band = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(band, blended, stretched)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, n, hd], cos/sin [B, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, :, None] + torch.cat((-x2, x1), dim=-1) * sin[:, :, None]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which KV-cache layer this module reads and writes
        H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.hd = hd
        self.q_proj = nn.Linear(H, nh * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(H, nkv * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(H, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, H, bias=cfg.o_bias)
        self.fused_rope = None  # (q, k, cos, sin) -> (q, k) rotated; set by bupo.models.liger.use_liger
        self.qk_norm = cfg.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, a: AttnArgs) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.hd)  # [B, T, nh, hd]
        k = self.k_proj(x).view(B, T, -1, self.hd)  # [B, T, nkv, hd]
        v = self.v_proj(x).view(B, T, -1, self.hd)  # [B, T, nkv, hd]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_rope is not None:
            q, k = self.fused_rope(q, k, a.cos, a.sin)
        else:
            q, k = apply_rope(q, a.cos, a.sin), apply_rope(k, a.cos, a.sin)
        if a.cache is None:
            o = causal_attention(q, k, v, a.packing)
        else:
            k, v = a.cache.update(self.layer_idx, a.start, k, v)  # [B, start+t, nkv, hd]
            o = masked_attention(q, k, v, a.mask)
        return self.o_proj(o.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(H, I, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(I, H, bias=cfg.mlp_bias)
        self.fused_swiglu = None  # (gate, up) -> silu(gate) * up; set by bupo.models.liger.use_liger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_swiglu is not None:
            return self.down_proj(self.fused_swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, a: AttnArgs, out: Captured | None = None) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]. When `out` is given it receives the modular quantities of this very pass."""
        attn_in = self.input_layernorm(x)
        attn_out = self.self_attn(attn_in, a)  # A_l, before the residual add
        h = x + attn_out
        ffn_in = self.post_attention_layernorm(h)
        ffn_out = self.mlp(ffn_in)  # F_l, before the residual add
        y = h + ffn_out
        if out is not None:
            out.update(layer_in=x, attn_in=attn_in, attn_out=attn_out, ffn_in=ffn_in, ffn_out=ffn_out, layer_out=y)
        return y


class Decoder(nn.Module):
    """HF's `model.*`: embeddings, decoder layers, final norm, RoPE tables."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class CausalLM(nn.Module):
    """`forward` -> logits; `hidden_states(layer=k)` runs decoder layers 0..k only; `capture` returns the
    per-layer modular quantities; `new_cache` / `decode` serve the built-in sampler. All four share `_run`."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share one Parameter between embed_tokens and lm_head when the config ties them (redo after a load)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _apply(self, fn, recurse=True):
        # to_empty() and device moves replace Parameters one module at a time, which would untie the head
        super()._apply(fn, recurse)
        self.tie_weights()
        return self

    def init_buffers(self, device: torch.device | str) -> None:
        """Compute the RoPE frequencies on `device` (needed after a meta build + assign=True load)."""
        self.model.rotary_emb.reset(device)

    @property
    def unembedding(self) -> torch.Tensor:
        return self.lm_head.weight  # [V, H]

    def _last_layer(self, layer: int | None) -> int:
        L = self.config.num_hidden_layers
        if layer is None:
            return L - 1
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < L:
            raise ValueError(f"layer must be None or an int in [0, {L - 1}], got {layer!r}")
        return layer

    def _run(self, input_ids, position_ids, layer, norm, capture: dict | None = None, keys=None, **attn):
        """Embed, run decoder layers 0..layer (all for None) -> [B, T, H], final-normed for layer=None or norm=True.
        `attn` completes AttnArgs (packing, or cache/start/mask); `capture` {i: None} gets layer i's modular
        quantities (only `keys` of them when given)."""
        last = self._last_layer(layer)
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        a = AttnArgs(cos, sin, **attn)
        for i in range(last + 1):
            out = Captured() if capture is not None and i in capture else None
            x = self.model.layers[i](x, a, out)
            if out is not None:  # keep only the requested quantities, so the others are freed layer by layer
                capture[i] = out.values if keys is None else {key: out.values[key] for key in keys}
        return self.model.norm(x) if layer is None or norm else x

    def _positions(self, input_ids, cu_seqlens, position_ids) -> dict:
        """position_ids (restarting per packed sequence when not given) and the packing of a [1, N] input."""
        B, T = input_ids.shape
        p = None
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"packed input (cu_seqlens given) must have shape [1, total], got {(B, T)}")
            p = packing(cu_seqlens, T, input_ids.device)
        if position_ids is None and p is not None:
            position_ids = packed_positions(p)
        elif position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        return {"position_ids": position_ids, "packing": p}

    def forward(self, input_ids: torch.Tensor, *, cu_seqlens=None, position_ids=None) -> torch.Tensor:
        """input_ids [B, T] (or [1, N] with cu_seqlens) -> logits [B, T, V] of the full policy."""
        return self.lm_head(self.hidden_states(input_ids, None, cu_seqlens=cu_seqlens, position_ids=position_ids))

    def hidden_states(
        self, input_ids: torch.Tensor, layer: int | None = None, *, cu_seqlens=None, position_ids=None, norm=False
    ) -> torch.Tensor:
        """[B, T, H]: layer=None -> final-normed state feeding lm_head; layer=k -> raw residual after decoder
        layer k (layers above k never run); norm=True applies model.norm to it."""
        return self._run(input_ids, layer=layer, norm=norm, **self._positions(input_ids, cu_seqlens, position_ids))

    def capture(self, input_ids: torch.Tensor, *, cu_seqlens=None, position_ids=None, layers=None,
                keys=None) -> list[dict]:
        """One dict per requested layer (all by default), in the order given, with layer_in, attn_in, attn_out,
        ffn_in, ffn_out, layer_out, each [B, T, H] (only `keys` of them when given). Runs layers up to max(layers)
        only."""
        idx = list(range(self.config.num_hidden_layers)) if layers is None else list(layers)
        for i in idx:
            self._last_layer(i)
        bad = set(keys or ()) - set(CAPTURE_KEYS)
        if bad:
            raise ValueError(f"capture keys {sorted(bad)} are unknown; valid: {', '.join(CAPTURE_KEYS)}")
        if not idx:
            return []
        got: dict = {i: None for i in idx}
        self._run(input_ids, layer=max(idx), norm=False, capture=got, keys=keys,
                  **self._positions(input_ids, cu_seqlens, position_ids))
        return [got[i] for i in idx]

    def new_cache(self, batch_size: int, max_len: int, *, num_layers=None, dtype=None, device=None) -> KVCache:
        """Empty KV cache; num_layers=k+1 is enough to decode with layer=k."""
        L, w = self.config.num_hidden_layers, self.model.embed_tokens.weight
        n = L if num_layers is None else num_layers
        if not 1 <= n <= L:
            raise ValueError(f"num_layers must be in [1, {L}], got {num_layers}")
        c = self.config
        return KVCache.empty(
            n, batch_size, max_len, c.num_key_value_heads, c.head_dim, dtype or w.dtype, device or w.device
        )

    @torch.no_grad()
    def decode(
        self, input_ids, position_ids, cache: KVCache, start: int, key_mask, *, layer=None, norm=False
    ) -> torch.Tensor:
        """Run t new tokens [B, t] against the cache: write their K/V to slots start..start+t-1, attend to slots
        < start+t where key_mask [B, start+t] is True, causal inside the chunk. Returns [B, t, H] with the
        layer/norm semantics of hidden_states."""
        last = self._last_layer(layer)
        if cache.num_layers <= last:
            raise ValueError(f"decoding up to layer {last} needs {last + 1} cache layers, cache has {cache.num_layers}")
        mask = decode_mask(key_mask.to(input_ids.device), start, input_ids.shape[1])  # [B, t, start+t]
        return self._run(input_ids, position_ids, layer, norm, cache=cache, start=start, mask=mask)


# The transformers class names, importable as before: every family is the one class above
LlamaConfig = Qwen3Config = DecoderConfig
LlamaForCausalLM = Qwen3ForCausalLM = CausalLM
