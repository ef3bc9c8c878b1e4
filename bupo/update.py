"""Packing rollouts into micro-batches, log-probs of the policy being optimized, and the PPO update.

Legend: S = sequences on this rank, total = packed tokens of a micro-batch, N = response tokens, H = hidden size.
The policy being optimized is pi^k (raw residual after layer k, `layer=k`) in BuPO's phase one and the full policy
(`layer=None`) after; both go through `model.hidden_states` + the fused log-prob/entropy kernel, so the
[tokens, vocab] logits never exist and phase one never runs the layers above k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels
from bupo.loss import policy_loss
from bupo.parallel import DistInfo, all_reduce


def phase_one_names(name: str, k: int) -> bool:
    """Parameters that change in phase one: layers 0..k and the embedding/head (tied or not)."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) <= k
    return name in ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class Seq:
    """One rollout: prompt + response token ids and the per-sequence training signals."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float = 0.0
    old_logp: torch.Tensor | None = None  # [len(response_ids)] under the policy being optimized, before the update
    ref_logp: torch.Tensor | None = None  # [len(response_ids)] under the reference policy (kl_coef > 0)
    sampler_logp: torch.Tensor | None = None  # [len(response_ids)] as reported by the rollout engine
    active: bool = True  # False: left out of the loss and the token count (zero-variance group filter)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class Packed:
    input_ids: torch.Tensor  # [1, total]
    cu_seqlens: torch.Tensor  # [S + 1] int32
    resp_pos: torch.Tensor  # [N] positions whose hidden state predicts a response token
    labels: torch.Tensor  # [N] the response tokens
    seq_index: torch.Tensor  # [N] which sequence each response token belongs to


def pack(seqs: list[Seq], device: torch.device) -> Packed:
    """Concatenate sequences into one row; position p-1+i predicts response token i of a prompt of length p."""
    ids, cu, pos, labels, owner = [], [0], [], [], []
    for s_i, s in enumerate(seqs):
        start, p, r = cu[-1], len(s.prompt_ids), len(s.response_ids)
        if p == 0:
            raise ValueError(f"sequence {s_i} has an empty prompt; a response token needs a predicting position")
        ids += s.prompt_ids + s.response_ids
        pos.extend(range(start + p - 1, start + p + r - 1))
        labels += s.response_ids
        owner += [s_i] * r
        cu.append(start + p + r)

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    return Packed(t(ids)[None], t(cu, torch.int32), t(pos), t(labels), t(owner))


def policy_logprobs(model: nn.Module, packed: Packed, *, layer: int | None, norm: bool = False,
                    temperature: float = 1.0, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [N], entropy [N]) fp32 of the response tokens under pi^layer (layer=None: the full policy).
    vocab_size: the policy is a softmax over the first vocab_size unembedding rows only (the tokenizer's real ids,
    the support both rollout engines sample from when the checkpoint pads its embedding); None: every row."""
    h = model.hidden_states(packed.input_ids, layer=layer, cu_seqlens=packed.cu_seqlens, norm=norm)  # [1, total, H]
    h = h[0].index_select(0, packed.resp_pos)  # [N, H]
    E = model.unembedding[:vocab_size]  # [V, H], a contiguous view (every row when vocab_size is None)
    return kernels.linear_logprob_entropy(h, E, packed.labels, temperature=temperature)


def split_micro_batches(seqs: list[Seq], token_budget: int, count: int | None = None) -> list[list[int]]:
    """Indices of `seqs` in micro-batches. Without `count`: greedy fill up to `token_budget` tokens (a longer
    sequence gets a batch of its own). With `count`: exactly `count` batches balanced by tokens (longest first
    into the lightest; empty ones when there are fewer sequences), which keeps the number of FSDP backward passes
    equal on every rank."""
    if count is None:
        batches, cur, used = [], [], 0
        for i, s in enumerate(seqs):
            if cur and used + len(s) > token_budget:
                batches.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += len(s)
        return batches + ([cur] if cur else [])
    bins: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for i in sorted(range(len(seqs)), key=lambda j: -len(seqs[j])):
        b = loads.index(min(loads))
        bins[b].append(i)
        loads[b] += len(seqs[i])
    return [sorted(b) for b in bins]


@torch.no_grad()
def compute_logprobs(model: nn.Module, seqs: list[Seq], *, layer: int | None, norm: bool, temperature: float,
                     token_budget: int, vocab_size: int | None = None) -> list[torch.Tensor]:
    """Per-sequence log-probs [len(response)] (fp32, CPU) without gradient, micro-batched by tokens."""
    out: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
    device = next(model.parameters()).device
    for idx in split_micro_batches(seqs, token_budget):
        packed = pack([seqs[i] for i in idx], device)
        logp, _ = policy_logprobs(model, packed, layer=layer, norm=norm, temperature=temperature,
                                  vocab_size=vocab_size)
        logp = logp.float().cpu()
        owner = packed.seq_index.cpu()
        for j, i in enumerate(idx):
            out[i] = logp[owner == j]
    return out


def update_policy(model: nn.Module, optimizer: torch.optim.Optimizer, seqs: list[Seq], *, info: DistInfo,
                  layer: int | None, norm: bool, temperature: float, mini_batches: int, token_budget: int,
                  clip_low: float, clip_high: float, dual_clip: float, entropy_coef: float = 0.0,
                  kl_coef: float = 0.0, grad_clip: float = 0.0, tis_cap: float = 0.0,
                  trainable: list[nn.Parameter] | None = None, scheduler=None,
                  vocab_size: int | None = None) -> dict[str, float]:
    """Run `mini_batches` optimizer steps over this rank's `seqs` (split in order, equal counts on every rank).

    The loss of each micro-batch is its token sum divided by the GLOBAL response-token count of the optimizer step
    (all micro-batches, all ranks); FSDP averages gradients over ranks, so the loss is scaled by the world size to
    make the reduced gradient exactly the gradient of the global token mean. `trainable`: the parameters the
    optimizer may touch (phase one: layers 0..k and the embedding/head); every other gradient is dropped before
    the step so AdamW (weight decay included) skips those parameters entirely. `vocab_size`: see policy_logprobs.
    """
    if len(seqs) % mini_batches:
        raise ValueError(f"{len(seqs)} sequences on rank {info.rank} do not split into {mini_batches} mini-batches")
    device = info.device
    per_mini = len(seqs) // mini_batches
    keep = None if trainable is None else {id(p) for p in trainable}
    sums: dict[str, float] = {}
    grad_norms: list[float] = []
    for m in range(mini_batches):
        mini = [s for s in seqs[m * per_mini:(m + 1) * per_mini] if s.active]
        global_tokens = float(all_reduce(torch.tensor([sum(len(s.response_ids) for s in mini)]))[0])
        count = int(all_reduce(torch.tensor([len(split_micro_batches(mini, token_budget))]), "max")[0])
        for idx in split_micro_batches(mini, token_budget, count=count):
            # a rank with fewer sequences than `count` still runs a (zero-weight) pass: FSDP's collectives pair up
            mb, scale = ([mini[i] for i in idx], 1.0) if idx else ([Seq([0], [0])], 0.0)
            packed = pack(mb, device)
            logp, ent = policy_logprobs(model, packed, layer=layer, norm=norm, temperature=temperature,
                                        vocab_size=vocab_size)
            adv = torch.tensor([mb[i].advantage for i in packed.seq_index.tolist()], device=device)
            old = torch.cat([s.old_logp for s in mb]).to(device) if mb[0].old_logp is not None else logp.detach()
            ref = torch.cat([s.ref_logp for s in mb]).to(device) if kl_coef and mb[0].ref_logp is not None else None
            isw = None
            # sampler vs trainer mismatch: only meaningful for the full policy (the sampler never samples pi^k)
            if layer is None and mb[0].sampler_logp is not None and scale:
                samp = torch.cat([s.sampler_logp for s in mb]).to(device)
                if m == 0:
                    sums["logp_mismatch"] = sums.get("logp_mismatch", 0.0) + float((old - samp).abs().sum())
                    sums["mismatch_tokens"] = sums.get("mismatch_tokens", 0.0) + samp.numel()
                if tis_cap:
                    isw = torch.exp(old - samp).clamp(max=tis_cap)
            loss, metrics = policy_loss(logp, old, adv, global_tokens=max(global_tokens, 1.0), clip_low=clip_low,
                                        clip_high=clip_high, dual_clip=dual_clip, entropy=ent,
                                        entropy_coef=entropy_coef, ref_logp=ref, kl_coef=kl_coef, is_weights=isw)
            (loss * (info.world_size * scale)).backward()
            if not scale:
                continue
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(v)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * global_tokens
            sums["tokens"] = sums.get("tokens", 0.0) + logp.numel()
        params = [p for p in model.parameters() if p.grad is not None]
        if keep is not None:
            for p in params:
                if id(p) not in keep:
                    p.grad = None
            params = [p for p in params if id(p) in keep]
        norm_t = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        grad_norms.append(float(norm_t.full_tensor() if hasattr(norm_t, "full_tensor") else norm_t))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
    keys = sorted(set(sums) | {"tokens", "loss", "logp_mismatch", "mismatch_tokens"})
    sums = {key: sums.get(key, 0.0) for key in keys}
    tot = dict(zip(keys, all_reduce(torch.tensor([sums[k] for k in keys])).tolist()))
    n = max(tot.pop("tokens"), 1.0)
    mismatch = (tot.pop("logp_mismatch", 0.0), tot.pop("mismatch_tokens", 0.0))
    out = {k: v / n for k, v in tot.items()}
    if mismatch[1]:
        out["logp_mismatch"] = mismatch[0] / mismatch[1]  # mean |trainer - sampler| log-prob, first mini-batch
    out["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return out
