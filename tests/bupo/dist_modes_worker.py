"""Worker for test_parallel_modes.py: the trainer's update under FSDP2 with activation checkpointing, compile and bf16
compute, under torchrun (gloo) or alone.

Usage: python tests/bupo/dist_modes_worker.py OUT.safetensors
Writes (rank 0) tensors named `<mode>.<phase>.<what>` and scalars as metadata, phase = "k1" (pi^1, phase one) or
"full". Modes:
  eager, ac, compile, ac_compile: one update_policy call (2 mini-batches, plain SGD, no clipping, so every weight moves
      by exactly -lr x its gradient) from the same initial weights; params after it, the loss, and how often layer
      0's MLP ran.
      compile uses backend aot_eager (the graphs and guards of inductor without a C++ build); after it, more
      updates and log-prob passes on batches of other lengths count the graphs dynamo made.
  bf16: FSDP2 with param_dtype=bfloat16, AdamW (the recipe's optimizer): log-probs of the whole batch and the loss
      before the step, next to fp32 FSDP2 and to a plain (no FSDP) model cast to bf16; dtypes of the parameters and
      of the AdamW state after the step; the gradient of one update (`grad_<net>.<param>`: fp32/bf16 FSDP2 from an
      SGD step at lr 1, plain32/plain16 from backward on the same loss).
"""

import math
import sys

import dist_update_worker as w
import torch
from safetensors.torch import save_file
from torch._dynamo.utils import counters

from bupo import checkpoint, models, parallel
from bupo.config import AlgoConfig
from bupo.loss import policy_loss
from bupo.rollout.interface import Rollout
from bupo.update import compute_logprobs, is_phase_one_param, pack, policy_logprobs, update_policy

K = 1
ALGO = AlgoConfig(micro_batch_tokens=12, clip_low=0.2, clip_high=0.2, dual_clip=10.0)


def lengths_batch(seed: int) -> list[Rollout]:
    """8 sequences whose lengths differ from w.batch(), so every micro-batch is a new packing."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(8):
        p, r = (int(x) for x in torch.randint(1, 10, (2,), generator=g))
        ids = torch.randint(1, 97, (p + r,), generator=g).tolist()
        out.append(Rollout(ids[:p], ids[p:], advantage=float(torch.randn((), generator=g))))
    return out


def with_old(seqs: list[Rollout]) -> list[Rollout]:
    """Fixed old log-probs near the uniform policy's -log V, so the loss depends on the new log-probs (with the
    trainer's default old = new it would be -mean(advantage) whatever the model)."""
    g = torch.Generator().manual_seed(2)
    for s in seqs:
        s.old_logp = -math.log(w.TINY["vocab_size"]) + 0.3 * torch.randn(len(s.response_ids), generator=g)
    return seqs


def share(seqs: list[Rollout], info: parallel.DistInfo) -> list[Rollout]:
    """This rank's part of each of the 2 mini-batches (as dist_update_worker)."""
    part = 4 // info.world_size
    return [s for m in range(2) for s in seqs[m * 4:(m + 1) * 4][info.rank * part:(info.rank + 1) * part]]


def build(info, **fsdp) -> torch.nn.Module:
    return parallel.apply_fsdp(models.build_model(w.TINY), info, **fsdp)


def update(model, opt, seqs, info, layer, mini_batches=2, grad_clip=0.0) -> dict:
    trainable = [p for n, p in model.named_parameters() if is_phase_one_param(n, layer)] if layer is not None else None
    return update_policy(model, opt, seqs, ALGO, info=info, mini_batches=mini_batches, layer=layer, norm=False,
                         temperature=1.0, grad_clip=grad_clip, trainable=trainable)


def gathered(model) -> dict[str, torch.Tensor]:
    return {n: parallel.full_tensor(p.detach()).clone().contiguous() for n, p in model.named_parameters()}


def sgd_modes(info, out: dict, meta: dict) -> None:
    for mode in ("eager", "ac", "compile", "ac_compile"):
        for tag, layer in (("k1", K), ("full", None)):
            model = build(info, activation_checkpointing="ac" in mode, compile="compile" in mode,
                          compile_backend="aot_eager")
            calls = [0]  # runs of layer 0's MLP: doubled by checkpointing's recompute in backward
            model.model.layers[0].mlp.register_forward_pre_hook(lambda mod, args: calls.__setitem__(0, calls[0] + 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            m = update(model, opt, share(with_old(w.batch()), info), info, layer)
            meta[f"{mode}.{tag}.loss"] = m["loss"]
            meta[f"{mode}.{tag}.mlp_calls"] = calls[0]
            out.update({f"{mode}.{tag}.{n}": t for n, t in gathered(model).items()})
            if "compile" in mode and tag == "full":
                count_graphs(model, info, meta, mode)


def count_graphs(model, info, meta: dict, mode: str) -> None:
    """Graphs dynamo has made (all modes so far) after one step of each phase and one no-grad pass, then after 3 more
    of each on new packings."""
    totals: set[int] = set()
    model.model.embed_tokens.register_forward_pre_hook(lambda mod, args: totals.add(args[0].shape[1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    compute_logprobs(model, share(w.batch(), info), layer=None, norm=False, temperature=1.0, token_budget=12)
    meta[f"{mode}.graphs_warm"] = counters["stats"]["unique_graphs"]
    for seed in (1, 2, 3):
        seqs = share(lengths_batch(seed), info)
        for layer in (K, None):
            update(model, opt, seqs, info, layer)
            compute_logprobs(model, seqs, layer=layer, norm=False, temperature=1.0, token_budget=12)
    meta[f"{mode}.graphs_after"] = counters["stats"]["unique_graphs"]
    meta[f"{mode}.new_packings"] = len(totals)


def advantages(seqs: list[Rollout]) -> torch.Tensor:
    return torch.cat([torch.full((len(s.response_ids),), s.advantage) for s in seqs])  # [N] per response token


def bf16_mode(info, out: dict, meta: dict) -> None:
    lp_kw = dict(norm=False, temperature=1.0, token_budget=12)
    for tag, layer in (("k1", K), ("full", None)):
        seqs = w.batch()
        nets = {"fp32": build(info), "bf16": build(info, param_dtype=torch.bfloat16)}
        # optimizers before any forward, as in the trainer: after a no-grad forward the root's parameters are its
        # gathered compute-dtype copies (reshard_after_forward=False) until the next backward
        opts = {name: torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1) for name, net in nets.items()}
        lp32 = torch.cat(compute_logprobs(nets["fp32"], seqs, layer=layer, **lp_kw))
        old = lp32 + 0.1 * torch.randn(lp32.shape, generator=torch.Generator().manual_seed(1))  # ratios near 1
        for s, o in zip(seqs, old.split([len(s.response_ids) for s in seqs])):
            s.old_logp = o
        for name, net in nets.items():
            out[f"bf16.{tag}.logp_{name}"] = torch.cat(compute_logprobs(net, seqs, layer=layer, **lp_kw))
            checkpoint.init_adamw_state(opts[name])
            m = update(net, opts[name], share(seqs, info), info, layer, mini_batches=1, grad_clip=1.0)
            meta[f"bf16.{tag}.loss_{name}"] = m["loss"]  # before the step: the loss at the initial weights
        meta[f"bf16.{tag}.param_dtypes"] = sorted({str(p.dtype) for p in nets["bf16"].parameters()})
        meta[f"bf16.{tag}.state_dtypes"] = sorted({str(v.dtype) for st in opts["bf16"].state.values()
                                                   for key, v in st.items() if key != "step"})
        meta[f"bf16.{tag}.updates"] = m["updates"]
        for name, dtype in (("plain32", torch.float32), ("plain16", torch.bfloat16)):
            plain = models.build_model(w.TINY, dtype=dtype)  # the same seeded weights, plain PyTorch, no FSDP
            lp, _ = policy_logprobs(plain, pack(seqs, torch.device("cpu")), layer=layer)
            out[f"bf16.{tag}.logp_{name}"] = lp.detach().float()
            # the gradient of the update's loss (one mini-batch of every sequence: the token mean of the batch)
            loss, _ = policy_loss(lp, old, advantages(seqs), global_tokens=float(lp.numel()), clip_low=ALGO.clip_low,
                                  clip_high=ALGO.clip_high, dual_clip=ALGO.dual_clip)
            loss.backward()
            for n, p in plain.named_parameters():
                if p.grad is not None:
                    out[f"bf16.{tag}.grad_{name}.{n}"] = p.grad.float()
        for name, fsdp in (("fp32", {}), ("bf16", {"param_dtype": torch.bfloat16})):
            # one step of the trainer's update with SGD at lr 1 and no clipping: every weight moves by -(its gradient)
            net = build(info, **fsdp)
            sgd = torch.optim.SGD(net.parameters(), lr=1.0)
            before = gathered(net)
            update(net, sgd, share(seqs, info), info, layer, mini_batches=1)
            for n, p in gathered(net).items():
                if not torch.equal(p, before[n]):
                    out[f"bf16.{tag}.grad_{name}.{n}"] = before[n] - p
        out[f"bf16.{tag}.old"] = old
        out[f"bf16.{tag}.adv"] = advantages(seqs)


def main(path: str) -> None:
    info = parallel.init_distributed("cpu")
    out: dict[str, torch.Tensor] = {}
    meta: dict = {}
    sgd_modes(info, out, meta)
    bf16_mode(info, out, meta)
    if info.is_main:
        save_file(out, path, metadata={k: repr(v) for k, v in meta.items()})
    parallel.destroy(wait=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
    parallel.exit_process()
