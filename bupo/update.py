"""Packing rollouts into micro-batches, log-probs of the policy being optimized, and the PPO update.

`pack` is the one packer of the project and `split_micro_batches` its one micro-batcher: the update and the old and
reference log-probs (through `collective_micro_batches`, the same number of micro-batches on every rank), the
entropy-flow analysis and the layer diagnostics (one packed batch) all feed `Rollout`s (bupo.rollout.interface)
through them.

Legend: S = sequences on this rank, total = packed tokens of a micro-batch, N = response tokens, H = hidden size.
The policy being optimized is pi^k (raw residual after layer k, `layer=k`) in BuPO's phase one and the full policy
(`layer=None`) after; both go through `model.hidden_states` + the fused log-prob/entropy kernel, so the
[tokens, vocab] logits never exist and phase one never runs the layers above k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bupo import kernels
from bupo.config import AlgoConfig
from bupo.loss import bounded_ratio, policy_loss
from bupo.parallel import DistInfo, all_reduce, reshard
from bupo.rollout.interface import Rollout


def is_phase_one_param(name: str, k: int) -> bool:
    """Whether parameter `name` changes in phase one: layers 0..k and the embedding/head (tied or not)."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) <= k
    return name in ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class Packed:
    input_ids: torch.Tensor  # [1, total]
    cu_seqlens: torch.Tensor  # [S + 1] int32
    resp_pos: torch.Tensor  # [N] positions whose hidden state predicts a response token
    labels: torch.Tensor  # [N] the response tokens
    seq_index: torch.Tensor  # [N] which sequence each response token belongs to


def pack(seqs: list[Rollout], device: torch.device) -> Packed:
    """Concatenate prompt + response of each rollout into one row; position p-1+i predicts response token i of a
    prompt of length p (the last response token is fed too: packed lengths are len(rollout))."""
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


def split_micro_batches(seqs: list[Rollout], token_budget: int, count: int | None = None) -> list[list[int]]:
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


def collective_micro_batches(seqs: list[Rollout], token_budget: int, *, balanced: bool = False) -> list[list[int]]:
    """split_micro_batches with the same number of micro-batches on every rank, as FSDP2 needs (every forward and
    backward is a collective): the largest greedy count over the ranks, and then either this rank's greedy fill
    padded with empty batches or (`balanced`) that many token-balanced bins. A rank packs `filler()` for an empty
    batch and gives it no weight. Collective: every rank calls it."""
    greedy = split_micro_batches(seqs, token_budget)
    count = int(all_reduce(torch.tensor([len(greedy)]), "max")[0])
    if balanced:
        return split_micro_batches(seqs, token_budget, count=count)
    return greedy + [[] for _ in range(count - len(greedy))]


def filler() -> Rollout:
    """What a rank packs for a micro-batch it has nothing for: its forward keeps FSDP's collectives paired."""
    return Rollout([0], [0])


@torch.no_grad()
def compute_logprobs(model: nn.Module, seqs: list[Rollout], *, layer: int | None, norm: bool, temperature: float,
                     token_budget: int, vocab_size: int | None = None) -> list[torch.Tensor]:
    """Per-sequence log-probs [len(response)] (fp32, CPU) without gradient, micro-batched by tokens (collective:
    every rank runs as many forwards)."""
    out: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
    device = next(model.parameters()).device
    for idx in collective_micro_batches(seqs, token_budget):
        packed = pack([seqs[i] for i in idx] or [filler()], device)
        logp, _ = policy_logprobs(model, packed, layer=layer, norm=norm, temperature=temperature,
                                  vocab_size=vocab_size)
        logp = logp.float().cpu()
        owner = packed.seq_index.cpu()
        for j, i in enumerate(idx):
            out[i] = logp[owner == j]
    reshard(model)  # no backward follows: drop the root's gathered weights
    return out


# Metrics update_policy returns on every rank, whatever was filtered: a fixed key set keeps the all-reduce aligned.
TOKEN_METRICS = ("loss", "pg_loss", "clip_frac", "dual_clip_frac", "approx_kl", "entropy", "kl_ref")


def update_policy(model: nn.Module, optimizer: torch.optim.Optimizer, seqs: list[Rollout], algo: AlgoConfig, *,
                  info: DistInfo, mini_batches: int, layer: int | None, norm: bool = False, temperature: float = 1.0,
                  grad_clip: float = 0.0, trainable: list[nn.Parameter] | None = None, scheduler=None,
                  vocab_size: int | None = None) -> dict[str, float]:
    """Run `mini_batches` optimizer steps over this rank's `seqs` (split in order, equal counts on every rank).

    `algo` gives the loss (clip_low, clip_high, dual_clip, entropy_coef, kl_coef, tis_cap) and the token budget of
    a packed micro-batch (micro_batch_tokens). The policy being optimized is pi^layer (`layer`, `norm`,
    `temperature`, `vocab_size`: see policy_logprobs). The loss of each micro-batch is its token sum divided by the
    GLOBAL response-token count of the optimizer step (all micro-batches, all ranks); the loss is scaled by
    `info.loss_scale` (the world size where FSDP2 averages gradients over ranks, 1 where it sums them; measured by
    parallel.apply_fsdp) so the reduced gradient is exactly the gradient of the global token mean. `trainable`: the
    parameters the optimizer may touch (phase one: layers 0..k and the embedding/head); every other gradient is
    dropped before the step so AdamW (weight decay included) skips those parameters entirely. `grad_clip`: max
    global gradient norm (0: off); `scheduler` steps with every optimizer step taken.

    Guards: an optimizer step whose summed loss (over all ranks) or global gradient norm is not finite is skipped
    (no weight, AdamW state or scheduler change) and counted in `nonfinite_skipped`; a mini-batch with no active
    token on any rank (zero-variance filter) takes no optimizer step at all.
    Returns the same keys for a given configuration: the token means of TOKEN_METRICS (kl_ref only with kl_coef;
    NaN when no token was trained on),
    `grad_norm` (mean over the optimizer steps taken; NaN when none), `updates`, `nonfinite_skipped`, and
    `logp_mismatch` (mean |trainer - sampler| log-prob, first mini-batch, full policy only; NaN otherwise).
    Statistics stay on the device and are synchronized once per optimizer step.
    """
    if len(seqs) % mini_batches:
        raise ValueError(f"{len(seqs)} sequences on rank {info.rank} do not split into {mini_batches} mini-batches")
    device = info.device
    per_mini = len(seqs) // mini_batches
    keep = None if trainable is None else {id(p) for p in trainable}
    sums = {key: torch.zeros((), dtype=torch.float64, device=device)
            for key in (*TOKEN_METRICS, "tokens", "logp_mismatch", "mismatch_tokens")}
    grad_norms: list[float] = []
    skipped = 0
    for m in range(mini_batches):
        mini = [s for s in seqs[m * per_mini:(m + 1) * per_mini] if s.active]
        global_tokens = float(all_reduce(torch.tensor([sum(len(s.response_ids) for s in mini)]))[0])
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for idx in collective_micro_batches(mini, algo.micro_batch_tokens, balanced=True):
            # a rank with fewer sequences than the others still runs a (zero-weight) pass: FSDP's collectives pair up
            mb, scale = ([mini[i] for i in idx], 1.0) if idx else ([filler()], 0.0)
            packed = pack(mb, device)
            logp, ent = policy_logprobs(model, packed, layer=layer, norm=norm, temperature=temperature,
                                        vocab_size=vocab_size)
            loss, metrics = _micro_batch_loss(algo, mb, packed, logp, ent, layer=layer, global_tokens=global_tokens,
                                              sums=sums if m == 0 and scale else None)
            (loss * (info.loss_scale * scale)).backward()
            if not scale:
                continue
            step_loss += loss.detach()
            for key, v in metrics.items():
                sums[key] += v
            sums["loss"] += loss.detach() * global_tokens
            sums["tokens"] += logp.numel()
        if global_tokens == 0:  # every sequence of this mini-batch was filtered out on every rank: nothing to learn
            optimizer.zero_grad(set_to_none=True)
        else:
            norm_t, finite = _clip_and_check(model, keep, grad_clip, step_loss)
            if finite:
                grad_norms.append(norm_t)
                optimizer.step()
                if scheduler is not None:  # the schedule counts the optimizer steps taken
                    scheduler.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
    reshard(model)  # a mini-batch without tokens ran no backward
    tot = dict(zip(sums, all_reduce(torch.stack(list(sums.values()))).tolist()))  # one host sync for the step
    n = tot["tokens"]
    out = {key: tot[key] / n if n else float("nan") for key in TOKEN_METRICS if key != "kl_ref" or algo.kl_coef}
    out["logp_mismatch"] = tot["logp_mismatch"] / tot["mismatch_tokens"] if tot["mismatch_tokens"] else float("nan")
    out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    out["updates"] = float(len(grad_norms))
    out["nonfinite_skipped"] = float(skipped)
    return out


def _micro_batch_loss(algo: AlgoConfig, mb: list[Rollout], packed: Packed, logp: torch.Tensor, ent: torch.Tensor, *,
                      layer: int | None, global_tokens: float,
                      sums: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, dict]:
    """policy_loss of one packed micro-batch: advantages broadcast over its response tokens, old log-probs (the new
    ones, detached, when the trainer computed none), reference log-probs with kl_coef, and the truncated
    importance weights of the sampler/trainer mismatch with tis_cap. `sums` (first mini-batch only) collects the
    mismatch |old - sampler| of the full policy (the sampler never samples pi^k)."""
    device = logp.device
    adv = torch.tensor([s.advantage for s in mb], device=device)[packed.seq_index]  # [N]
    old = torch.cat([s.old_logp for s in mb]).to(device) if mb[0].old_logp is not None else logp.detach()
    ref = torch.cat([s.ref_logp for s in mb]).to(device) if algo.kl_coef and mb[0].ref_logp is not None else None
    isw = None
    if layer is None and mb[0].logprobs is not None:
        samp = torch.cat([torch.as_tensor(s.logprobs, dtype=torch.float32) for s in mb]).to(device)  # [N]
        if sums is not None:
            sums["logp_mismatch"] += (old - samp).abs().sum()
            sums["mismatch_tokens"] += samp.numel()
        if algo.tis_cap:
            isw = bounded_ratio(old - samp).clamp(max=algo.tis_cap)
    return policy_loss(logp, old, adv, global_tokens=max(global_tokens, 1.0), clip_low=algo.clip_low,
                       clip_high=algo.clip_high, dual_clip=algo.dual_clip, entropy=ent,
                       entropy_coef=algo.entropy_coef, ref_logp=ref, kl_coef=algo.kl_coef, is_weights=isw)


def _clip_and_check(model: nn.Module, keep: set[int] | None, grad_clip: float,
                    step_loss: torch.Tensor) -> tuple[float, bool]:
    """Drop the gradients of frozen parameters, clip the rest to `grad_clip` (0: no clipping) and say whether the
    global gradient norm and the loss summed over ranks are finite (one host sync). Returns (norm, finite)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if keep is not None:
        for p in params:
            if id(p) not in keep:
                p.grad = None
        params = [p for p in params if id(p) in keep]
    norm_t = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    norm_t = norm_t.full_tensor() if hasattr(norm_t, "full_tensor") else norm_t
    loss_sum = float(all_reduce(step_loss.reshape(1))[0])
    norm = float(norm_t)
    return norm, math.isfinite(norm) and math.isfinite(loss_sum)
