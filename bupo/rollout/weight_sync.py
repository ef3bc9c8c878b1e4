"""Weight sync from the (FSDP2-sharded) trainer to a rollout engine: what to send, in which buckets, under which names.

    sent_bytes = sync_weights(model, engine, k)   # after each update; k=None sends everything

Pure planning (`plan_buckets`, `chunk_by_bytes`, `sync_names`, `module_owners`, `whole_modules`) runs anywhere;
`iter_full_tensors` is a collective under FSDP2 (every rank walks the same parameter order and gathers the same ones).

Sizes: a bucket holds at most `max_bucket_bytes` of full tensors (one bigger tensor gets a bucket of its own), so the
peak extra memory of a sync is one bucket, whatever the model size. Phase one of BuPO sends only layers 0..k and the
embedding/head: the other parameters did not change (bupo.update.is_phase_one_param).

Names: we send HF checkpoint names (our module names mirror them), which is what the engines' loaders take: the
built-in engine's modules have the same names, and vLLM's Llama/Qwen2/Qwen3 `load_weights` renames itself (q/k/v_proj
into the fused `qkv_proj`, gate/up_proj into `gate_up_proj`). A tied head is one Parameter, sent once as
`model.embed_tokens.weight` and never as `lm_head.weight` (`sync_names`).

Whole modules: an engine that fuses tensors (vLLM's qkv_proj, gate_up_proj) and processes a module once all of its
tensors arrived must get all of them in one sync, or it runs on a half-written module. `module_owners` maps each HF
name to the engine module that owns it and `whole_modules` passes a stream on module by module, refusing (ValueError
naming the missing tensor) a module that the stream leaves incomplete. Phase one sends whole decoder layers, so it
always passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from bupo.parallel import full_tensor
from bupo.update import is_phase_one_param

DEFAULT_BUCKET_BYTES = 512 * 2**20  # 512 MiB of full tensors per bucket


def tensor_bytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def plan_buckets(named_shapes_dtypes: Iterable[tuple[str, Iterable[int], torch.dtype]],
                 max_bucket_bytes: int) -> list[list[str]]:
    """Split parameter names into consecutive buckets, in the given order, every name exactly once: greedy fill up
    to `max_bucket_bytes`; a tensor larger than that gets a bucket of its own."""
    if max_bucket_bytes <= 0:
        raise ValueError(f"max_bucket_bytes={max_bucket_bytes} is invalid; it must be > 0")
    buckets: list[list[str]] = []
    used = 0
    for name, shape, dtype in named_shapes_dtypes:
        size = tensor_bytes(shape, dtype)
        if not buckets or used + size > max_bucket_bytes:
            buckets.append([])
            used = 0
        buckets[-1].append(name)
        used += size
    return buckets


def chunk_by_bytes(named_tensors: Iterable[tuple[str, torch.Tensor]],
                   max_bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Streaming twin of `plan_buckets`: group a lazy stream of (name, tensor) into buckets.

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


def module_owners(engine_names: Iterable[str],
                  fused: dict[str, list[str]]) -> tuple[dict[str, str], dict[str, frozenset[str]]]:
    """Which engine module owns each HF tensor name, and the HF names each module needs.

    engine_names: the engine model's parameter names (vLLM's: `model.layers.0.self_attn.qkv_proj.weight`, with a
    tied head listed once). fused: engine module name -> the HF modules fused into it (vLLM's
    `packed_modules_mapping`, e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}). Returns (owner: HF name -> engine
    module path, members: engine module path -> its HF names). An engine module with a weight and a bias needs both,
    of every fused part.
    """
    owner: dict[str, str] = {}
    members: dict[str, set[str]] = {}
    for name in engine_names:
        module, _, leaf = name.rpartition(".")
        parent, _, child = module.rpartition(".")
        for part in fused.get(child, [child]):
            hf = f"{parent}.{part}.{leaf}" if parent else f"{part}.{leaf}"
            owner[hf] = module
            members.setdefault(module, set()).add(hf)
    return owner, {m: frozenset(names) for m, names in members.items()}


def whole_modules(named_tensors: Iterable[tuple[str, torch.Tensor]], owner: dict[str, str],
                  members: dict[str, frozenset[str]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass a stream of (HF name, tensor) on, each engine module's tensors together once all of them arrived.

    Holds back at most the tensors of the modules still incomplete (q and k until v comes). ValueError for a name the
    engine does not have, for a tensor sent twice in one stream, and at the end of the stream for a module that got
    only part of its tensors (naming the first missing one); the held-back tensors of such a module are never yielded,
    so the engine keeps that module's old weights whole.
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in named_tensors:
        if name not in owner:
            raise ValueError(f"update_weights: the engine's model has no tensor {name!r} (tied heads are sent as "
                             "model.embed_tokens.weight only)")
        module = owner[name]
        got = pending.setdefault(module, {})
        if name in got:
            raise ValueError(f"update_weights: tensor {name!r} was sent twice in one sync")
        got[name] = t
        if len(got) == len(members[module]):
            yield from pending.pop(module).items()
    if pending:
        module, got = next(iter(pending.items()))
        missing = sorted(members[module] - got.keys())
        raise ValueError(f"update_weights: partial module sync refused: {missing[0]!r} is missing, and the engine "
                         f"loads {module} only whole (with {sorted(got)}); send all of "
                         f"{sorted(members[module])} or none")


def sync_names(model: nn.Module, k: int | None) -> list[str]:
    """Parameter names a sync sends, in parameter order: all of them (k=None), or phase one's layers 0..k and the
    embedding/head. A tied head is one Parameter, listed once as `model.embed_tokens.weight`."""
    return [n for n, _ in model.named_parameters() if k is None or is_phase_one_param(n, k)]


def iter_full_tensors(model: nn.Module, names: Iterable[str], bucket_bytes: int = DEFAULT_BUCKET_BYTES, *,
                      dtype: torch.dtype | None = None) -> Iterator[tuple[list[tuple[str, torch.Tensor]], int]]:
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
    plan = plan_buckets(((n, p.shape, dtype or p.dtype) for n, p in params), bucket_bytes)
    for bucket_names in plan:
        bucket, nbytes = [], 0
        for name in bucket_names:
            p = by_name[name].detach()
            t = full_tensor(p.to(dtype) if dtype is not None else p)
            bucket.append((name, t))
            nbytes += t.numel() * t.element_size()
        yield bucket, nbytes


def sync_weights(model: nn.Module, engine, k: int | None) -> int:
    """Stream full tensors to the rollout engine in bounded buckets (only layers 0..k and the head when k is given,
    cast to the engine's dtype before the FSDP all-gather when it has one); returns the bytes sent. Collective."""
    sent = 0

    def tensors():
        nonlocal sent
        for bucket, nbytes in iter_full_tensors(model, sync_names(model, k), dtype=getattr(engine, "dtype", None)):
            sent += nbytes
            yield from bucket

    engine.update_weights(tensors())
    return sent
