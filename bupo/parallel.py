"""Process group, FSDP2 sharding and the few collectives the trainer needs.

A single process runs the same code path as torchrun: it joins a world of size 1 through an in-memory store, so
`fully_shard`, DCP checkpoints and the all-reduces behave identically (the single-GPU / laptop debug mode).
Order of wrapping (torchtitan's): activation checkpointing -> compile -> fully_shard per decoder layer -> root.
Compile covers the norms and MLPs only (see COMPILED): attention reads the packing of the micro-batch, which would
make a graph per packing.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import warnings
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
    # what each rank's loss is multiplied by so that FSDP2's reduced gradient is the gradient of the sum of the ranks'
    # losses: world_size where FSDP2 averages gradients over ranks, 1 where it sums them (torch 2.8 with gloo);
    # measured by apply_fsdp (see gradient_reduction_factor)
    loss_scale: float = 1.0

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


def destroy(wait: bool = False) -> None:
    """Leave the process group. wait=True (a rank that finished normally) first waits for the other ranks, so none
    tears gloo down while a peer still talks to it; a failing rank does not wait for peers that may never arrive.
    A finished torchrun worker then ends with exit_process()."""
    if dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def exit_process() -> None:
    """End a torchrun worker (WORLD_SIZE > 1) that finished its work, after destroy(): atexit handlers run, output
    is flushed, then the process leaves without the interpreter's teardown (os._exit(0)). gloo's threads outlive
    destroy_process_group (the FSDP2 device mesh still holds the group), and tearing them down during interpreter
    shutdown aborted about one 2-process run in 35 under load ('terminate called without an active exception',
    exit code -6 after every rank had finished and written its outputs). A single process returns normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _checkpointed(fwd, *args, **kwargs):
    """Run a decoder layer under non-reentrant activation checkpointing when a backward will follow: only its input
    is kept and the layer is recomputed in backward (same ops, same values: gradients are unchanged)."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fwd, *args, use_reentrant=False, **kwargs)
    return fwd(*args, **kwargs)


# What model.compile compiles, by HF module name inside each decoder layer (plus the final norm): modules that map a
# tensor to a tensor, so their graphs depend only on the input's rank, dtype and the grad mode, never on the packing.
# The attention module stays eager: its packing (sequence boundaries as Python ints on CPU, max_seqlen on CUDA)
# would specialize a graph per micro-batch. Each module's `forward` is compiled (one code object, hence one
# recompile budget, per class) with dynamic=True: the packed token count is symbolic from the first call.
COMPILED = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm", "mlp")


def compile_modules(model: nn.Module, backend: str = "inductor", device: torch.device | None = None) -> list[nn.Module]:
    """torch.compile the COMPILED modules of every decoder layer and the final norm in place (state-dict keys are
    unchanged); modules that liger-kernel already fuses stay as they are (warned once). Returns the compiled ones.
    `device`: where the model will run (default: where its parameters are; a meta-built model passes it)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if backend == "inductor" and device.type == "cpu":
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            raise ValueError("model.compile=true on CPU needs a C++ compiler for inductor (g++, or $CXX); none was "
                             "found: install one or set model.compile=false") from None
    mods = [m for layer in model.model.layers for name, m in layer.named_modules() if name in COMPILED]
    mods.append(model.model.norm)
    fused = [m for m in mods if getattr(m, "fused_norm", None) or getattr(m, "fused_swiglu", None)]
    if fused:
        warnings.warn(f"model.compile: {len(fused)} of {len(mods)} norm/MLP modules are already fused by "
                      "liger-kernel and stay uncompiled (model.liger=off compiles them instead)", stacklevel=2)
    todo = [m for m in mods if m not in fused]
    for m in todo:
        m.forward = torch.compile(m.forward, backend=backend, dynamic=True, fullgraph=True)
    return todo


def apply_fsdp(model: nn.Module, info: DistInfo, *, param_dtype: torch.dtype = torch.float32,
               activation_checkpointing: bool = False, compile: bool = False,
               compile_backend: str = "inductor") -> nn.Module:
    """Shard `model` in place with FSDP2: one unit per decoder layer plus the root (embedding, final norm, head).

    Parameters stay fp32 (the optimizer's master copy); `param_dtype` is the compute dtype of the all-gathered
    weights, gradients are reduced in fp32. The root keeps its weights gathered after forward so the head
    (`model.unembedding`) can be used by the log-prob kernel right after `model.hidden_states(...)`.
    Layers a forward never reaches (above k in phase one) are never gathered and get no gradient.
    `compile`: see compile_modules (`compile_backend` is for tests: aot_eager traces the same graphs without a
    C++ build).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if activation_checkpointing:
        for layer in model.model.layers:
            layer.forward = functools.partial(_checkpointed, layer.forward)
    if compile:
        compile_modules(model, compile_backend, info.device)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    for name in ("hidden_states", "capture"):
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    info.loss_scale = info.world_size / gradient_reduction_factor(info, mp)
    return model


def gradient_reduction_factor(info: DistInfo, mp_policy=None) -> float:
    """What FSDP2's gradient reduction gives for a gradient of 1 on every rank, measured on a one-row-per-rank probe:
    1.0 where it averages over ranks (the documented behaviour), world_size where it sums. torch 2.8 with gloo sums
    (measured: 2 processes gave exactly twice the 1-process gradient), torch 2.9+ averages; NCCL is not assumed
    either way. Any other value is an error: the reduction is neither and training would be wrong."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    W = info.world_size
    if W == 1:
        return 1.0
    probe = nn.Linear(1, W, bias=False, device=info.device)  # weight [W, 1]: one row per rank
    fully_shard(probe, mesh=init_device_mesh(info.device.type, (W,)), mp_policy=mp_policy)
    probe(torch.ones(1, 1, device=info.device)).sum().backward()  # d/dw = 1 for every element, on every rank
    got = float(probe.weight.grad.full_tensor().float().mean())
    for factor in (1.0, float(W)):
        if abs(got - factor) < 1e-6 * factor:
            return factor
    raise RuntimeError(f"FSDP2 reduced a gradient of 1 on each of {W} ranks to {got}; expected 1 (mean) or {W} "
                       f"(sum) (torch {torch.__version__}, backend {dist.get_backend()})")


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


def all_reduce_dict(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """All-reduce named scalars; every rank must pass the same keys (checked: a mismatch would pair wrong values)."""
    keys = sorted(values)
    if dist.is_initialized() and dist.get_world_size() > 1:
        names: list = [None] * dist.get_world_size()
        dist.all_gather_object(names, keys)
        if any(n != keys for n in names):
            raise AssertionError(f"all_reduce_dict: ranks disagree on the keys: {names}")
    return dict(zip(keys, all_reduce(torch.tensor([float(values[k]) for k in keys]), op).tolist()))


def rank_share(batch_size: int, mini_batch_size: int, info: DistInfo) -> list[int]:
    """Positions (in the global batch) of the prompts this rank rolls out and trains on.

    Each mini-batch of `mini_batch_size` consecutive prompts is split into equal contiguous parts, one per rank, so
    the set of prompts of every optimizer step is the same on any number of ranks: a run does not depend on the
    world size beyond float reduction order. Needs batch_size % mini_batch_size == 0 and mini_batch_size %
    world_size == 0 (Config.validate and the trainer check both)."""
    part = mini_batch_size // info.world_size
    return [m + info.rank * part + j for m in range(0, batch_size, mini_batch_size) for j in range(part)]


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


def broadcast_object(value: object, src: int = 0) -> object:
    """Rank `src`'s picklable value (a message, a list of steps) on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def load_sharded(model: nn.Module, path: str | os.PathLike, info: DistInfo) -> nn.Module:
    """Materialize a meta-built model that apply_fsdp has sharded (models.build_meta -> apply_fsdp -> here) on
    info.device and fill each rank's shards from the HF checkpoint in `path`: the torchtitan order, so a rank holds
    its shard plus one full tensor at a time (read on the CPU; only the shard goes to the device), never a replica.

    Checked as models.load_pretrained checks (names and shapes, one ValueError naming the folder) before any tensor is
    read; tensors are cast to the parameters' dtype (fp32). A tied head is the embedding's parameter (FSDP2 shards it
    once and keeps the tie); the RoPE buffers, not in the checkpoint, are computed on the device. Equal to
    load_pretrained + apply_fsdp, bit for bit."""
    from bupo import models

    names = models.check_checkpoint(model, path)
    model.to_empty(device=info.device)  # FSDP2 re-pads the local shards; the tie survives (CausalLM._apply)
    model.init_buffers(info.device)
    params = dict(model.named_parameters())  # a tied head is listed once, as model.embed_tokens.weight
    assert names >= params.keys(), sorted(params.keys() - names)
    with torch.no_grad():
        for name, full in models.iter_safetensors(path, names=params.keys()):
            _copy_shard(params[name], full)
            del full  # before the next read: one full tensor at a time
    return model


def _copy_shard(param: nn.Parameter, full: torch.Tensor) -> None:
    """Copy this rank's rows of `full` into `param`. FSDP2's Shard(0) is torch.chunk over the ranks: the first ranks
    get ceil(rows / world) rows, the last may get fewer, and ranks past the last chunk none."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):  # a parameter FSDP2 left whole
        param.copy_(full)
        return
    mesh, local = param.device_mesh, param.to_local()
    assert mesh.ndim == 1 and tuple(param.placements) == (Shard(0),), param.placements
    chunks = full.chunk(mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    piece = chunks[rank] if rank < len(chunks) else full[:0]
    assert piece.shape == local.shape, (piece.shape, local.shape)
    local.copy_(piece)


def reshard(model: nn.Module) -> None:
    """Free the gathered weights that a forward without backward leaves behind. The root unit keeps its weights
    gathered after forward (reshard_after_forward=False, for the head); a backward reshards it, a no-grad pass does
    not, and until then `model.parameters()` would hand out the gathered compute-dtype tensors instead of the fp32
    shards (to a checkpoint, the weight sync or an optimizer). A no-op on a model that FSDP2 does not wrap."""
    if hasattr(model, "reshard"):
        model.reshard()
