"""Process group, FSDP2 sharding and the few collectives the trainer needs.

A single process runs the same code path as torchrun: it joins a world of size 1 through an in-memory store, so
`fully_shard`, DCP checkpoints and the all-reduces behave identically (the single-GPU / laptop debug mode).
Order of wrapping (torchtitan's): activation checkpointing -> compile -> fully_shard per decoder layer -> root.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun world (env:// rendezvous) or a world of one; pick NCCL on CUDA, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("trainer.device='cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, device_id=dev if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _checkpointed(fwd, *args, **kwargs):
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fwd, *args, use_reentrant=False, **kwargs)
    return fwd(*args, **kwargs)


def apply_fsdp(model: nn.Module, info: DistInfo, *, param_dtype: torch.dtype = torch.float32,
               activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """Shard `model` in place with FSDP2: one unit per decoder layer plus the root (embedding, final norm, head).

    Parameters stay fp32 (the optimizer's master copy); `param_dtype` is the compute dtype of the all-gathered
    weights, gradients are reduced in fp32. The root keeps its weights gathered after forward so the head
    (`model.unembedding`) can be used by the log-prob kernel right after `model.hidden_states(...)`.
    Layers a forward never reaches (above k in phase one) are never gathered and get no gradient.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        if activation_checkpointing:
            layer.forward = functools.partial(_checkpointed, layer.forward)
        if compile:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    for name in ("hidden_states", "capture"):
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter; a collective for DTensors (every rank must call)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce a small tensor of statistics (float64 on the wire to keep token counts exact)."""
    t = values.detach().to(torch.float64).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = t.to(dev)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.cpu()


def all_gather_1d(values: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-length 1-D tensors of every rank in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values.detach().clone()
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = values.detach().to(torch.float64).to(dev)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.cat(out).cpu().to(values.dtype)


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank `src`'s value on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=dev)
    dist.broadcast(t, src)
    return int(t.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
