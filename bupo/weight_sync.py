"""Weight sync from the (FSDP2-sharded) trainer to a rollout engine: what to send, in which buckets, under which names.

Pure planning (`plan_buckets`, `chunk_by_bytes`, `vllm_names`, `sync_names`) runs anywhere; `iter_full_tensors` is a
collective under FSDP2 (every rank walks the same parameter order and gathers the same tensors).

Sizes: a bucket holds at most `max_bucket_bytes` of full tensors (one bigger tensor gets a bucket of its own), so the
peak extra memory of a sync is one bucket, whatever the model size. Phase one of BuPO sends only layers 0..k and the
embedding/head: the other parameters did not change (bupo.update.phase_one_names).

Names: we send HF checkpoint names (our module names mirror them). vLLM's Llama/Qwen2/Qwen3 `load_weights` take HF
names and do the renaming themselves: q/k/v_proj are written into the fused `qkv_proj` and gate/up_proj into
`gate_up_proj`. With tied embeddings vLLM's head is the embedding, and we never send `lm_head.weight` (`sync_names`
leaves it out): older vLLM releases skip it, recent ones treat it as an alias of the embedding and refuse a
`load_weights` call that holds it without `model.embed_tokens.weight`. So no renaming is needed before calling
vLLM; `vllm_names` documents (and the tests pin) where each tensor lands.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from bupo.parallel import full_tensor
from bupo.update import phase_one_names

DEFAULT_BUCKET_BYTES = 512 * 2**20  # 512 MiB of full tensors per bucket
VLLM_MODEL_TYPES = ("qwen3", "qwen2", "llama")  # HF model_type values whose vLLM loader takes HF names

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FUSED = {  # HF projection -> the fused vLLM parameter it is written into (a shard of it)
    "self_attn.q_proj": "self_attn.qkv_proj",
    "self_attn.k_proj": "self_attn.qkv_proj",
    "self_attn.v_proj": "self_attn.qkv_proj",
    "mlp.gate_proj": "mlp.gate_up_proj",
    "mlp.up_proj": "mlp.gate_up_proj",
}
_LAYER_PARAMS = re.compile(
    r"^(self_attn\.[qkvo]_proj|self_attn\.[qk]_norm|mlp\.(gate|up|down)_proj|input_layernorm|post_attention_layernorm)"
    r"\.(weight|bias)$")
_TOP_PARAMS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def tensor_bytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def layer_of(name: str) -> int | None:
    """Decoder-layer index of a parameter name (`model.layers.{i}.…`), None for the embedding, final norm and head."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def plan_buckets(named_shapes_dtypes: Iterable[tuple[str, Iterable[int], torch.dtype]], max_bucket_bytes: int,
                 *, per_layer: bool = False) -> list[list[str]]:
    """Split parameter names into consecutive buckets, in the given order, every name exactly once.

    By size (default): greedy fill up to `max_bucket_bytes`; a tensor larger than that gets a bucket of its own.
    per_layer=True: one bucket per decoder layer (all of `model.layers.{i}.*`) and one per other parameter
    (embedding, final norm, head), whatever their size.
    """
    if max_bucket_bytes <= 0:
        raise ValueError(f"max_bucket_bytes={max_bucket_bytes} is invalid; it must be > 0")
    buckets: list[list[str]] = []
    used, key = 0, object()
    for name, shape, dtype in named_shapes_dtypes:
        size = tensor_bytes(shape, dtype)
        if per_layer:
            k = layer_of(name)
            new = not buckets or k is None or k != key
            key = k if k is not None else object()
        else:
            new = not buckets or used + size > max_bucket_bytes
        if new:
            buckets.append([])
            used = 0
        buckets[-1].append(name)
        used += size
    return buckets


def chunk_by_bytes(named_tensors: Iterable[tuple[str, torch.Tensor]],
                   max_bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Streaming twin of `plan_buckets` (by size): group a lazy stream of (name, tensor) into buckets.

    Pulls one tensor at a time, so a lazy producer (gathering on demand) keeps at most one bucket alive.
    """
    if max_bucket_bytes <= 0:
        raise ValueError(f"max_bucket_bytes={max_bucket_bytes} is invalid; it must be > 0")
    bucket: list[tuple[str, torch.Tensor]] = []
    used = 0
    for name, t in named_tensors:
        size = t.numel() * t.element_size()
        if bucket and used + size > max_bucket_bytes:
            yield bucket
            bucket, used = [], 0
        bucket.append((name, t))
        used += size
    if bucket:
        yield bucket


def sync_names(model: nn.Module, k: int | None) -> list[str]:
    """Parameter names a sync sends, in parameter order: all of them (k=None), or phase one's layers 0..k and the
    embedding/head. A tied head is one Parameter, listed once as `model.embed_tokens.weight`."""
    return [n for n, _ in model.named_parameters() if k is None or phase_one_names(n, k)]


def iter_full_tensors(model: nn.Module, names: Iterable[str], bucket_bytes: int = DEFAULT_BUCKET_BYTES, *,
                      dtype: torch.dtype | None = None,
                      per_layer: bool = False) -> Iterator[tuple[list[tuple[str, torch.Tensor]], int]]:
    """Yield (bucket, bytes): buckets of (name, full tensor) of the named parameters, in parameter order.

    A collective under FSDP2: each sharded (DTensor) parameter is all-gathered with `full_tensor`, so every rank
    must call this with the same names and consume every bucket. `dtype` casts the local shard before the gather
    (bf16 halves the bytes on the wire and in the bucket). Tensors are detached; a non-sharded model yields its own
    parameters (cast if `dtype` is given).
    """
    wanted = set(names)
    params = [(n, p) for n, p in model.named_parameters() if n in wanted]
    missing = wanted - {n for n, _ in params}
    if missing:
        raise ValueError(f"iter_full_tensors: no parameters named {sorted(missing)[:5]} in the model")
    by_name = dict(params)
    plan = plan_buckets(((n, p.shape, dtype or p.dtype) for n, p in params), bucket_bytes, per_layer=per_layer)
    for bucket_names in plan:
        bucket, nbytes = [], 0
        for name in bucket_names:
            p = by_name[name].detach()
            t = full_tensor(p.to(dtype) if dtype is not None else p)
            bucket.append((name, t))
            nbytes += t.numel() * t.element_size()
        yield bucket, nbytes


def vllm_names(hf_name: str, model_type: str, *, tied: bool = False) -> list[str]:
    """The vLLM parameter(s) an HF tensor is written into when passed (under its HF name) to vLLM's load_weights.

    Identity except: q/k/v_proj -> `qkv_proj` and gate/up_proj -> `gate_up_proj` (vLLM's fused layers; each HF tensor
    fills one shard), and with tied embeddings `lm_head.weight` -> [] (nothing of its own: vLLM's head is the
    embedding, so the tensor is never sent; see the module docstring).
    ValueError for a model type or parameter vLLM's loader would not recognise.
    """
    if model_type not in VLLM_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} has no vLLM name mapping; "
                         f"supported: {', '.join(VLLM_MODEL_TYPES)}")
    if hf_name in _TOP_PARAMS:
        return [] if (tied and hf_name == "lm_head.weight") else [hf_name]
    m = _LAYER.match(hf_name)
    rest = hf_name[m.end():] if m else ""
    if not m or not _LAYER_PARAMS.match(rest):
        raise ValueError(f"parameter {hf_name!r} is not a {model_type} parameter vLLM's loader knows")
    module, _, kind = rest.rpartition(".")
    fused = _FUSED.get(module, module)
    return [f"{hf_name[:m.end()]}{fused}.{kind}"]
