"""Advantages and the clipped policy-gradient loss shared by GRPO and BuPO: pure functions over tensors.

Legend: S = sequences (prompts x samples), N = response tokens of a packed micro-batch (flat), G = group size.

How BuPO differs from GRPO (paper arXiv 2512.19673, eqs. 12-15):
  1. For steps 1..s_inter the policy being optimized is the internal layer policy pi^k = softmax(h_k E^T / T) of the
     raw residual stream after layer k (no final norm), for BOTH the new and the old log-probs:
     ratio = pi^k(y) / pi^k_old(y). The rollouts still come from the full policy.
  2. Only layers 0..k and E receive gradient in phase one (the gradient of pi^k cannot reach anything above k).
  3. From step s_inter + 1 on it is plain GRPO on the full policy. The loss below is the same in both phases; only
     the log-probs fed to it differ.

How this implementation differs from the paper's reference code (a verl fork):
  1. Phase one runs layers 0..k only (forward and backward); the reference runs the whole model and builds both the
     layer-k and the final [tokens, vocab] logits.
  2. Log-probs and entropies come from a fused kernel on hidden states; no [tokens, vocab] tensor is kept.
  3. The logged `entropy` is the entropy of the policy being optimized (pi^k in phase one); the reference logs the
     final layer's entropy in phase one.
  4. Layers above k and the final norm are never handed to the optimizer step in phase one, so weight decay cannot
     touch them (the reference decays the final norm with a zero gradient).
  5. The token mean is over the global response-token count of the optimizer step (all micro-batches, all ranks),
     passed in explicitly, rather than a per-micro-batch mean.
  6. Every policy (the samplers' and the trainer's, pi^k and the full one) is a softmax over the tokenizer's real ids
     only: the padded embedding rows of Qwen checkpoints (267 of 151936) are never sampled and carry no probability
     mass in the log-probs and entropies.
  7. Every exp of a log-prob difference is bounded (see LOG_RATIO_BOUND, KL_BOUND), so one token whose log-prob
     moved by tens of nats cannot produce an inf (and through it a NaN gradient); verl bounds them the same way.
"""

from __future__ import annotations

import torch

# Log-prob differences are clamped to +-LOG_RATIO_BOUND nats before any exp (ratio, k3 KL, importance weights): exp(20)
# = 4.9e8 is far beyond every clip range yet finite in fp32, while exp(89) is inf. A phase-one step of the CPU demo
# moved a log-prob by ~21 nats. The clamped tokens get zero gradient, which is what the clip gives them anyway.
LOG_RATIO_BOUND = 20.0
KL_BOUND = 10.0  # the per-token k3 KL estimate is clamped to [-KL_BOUND, KL_BOUND] (verl uses the same bounds)


def bounded_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(log_ratio) with log_ratio clamped to [-LOG_RATIO_BOUND, LOG_RATIO_BOUND]: finite, and zero gradient
    outside the bound."""
    return torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))


# The fewest samples per group each estimator's baseline needs (a std or a leave-one-out mean of one sample is
# undefined); reinforce_pp whitens over the whole batch and has no group baseline.
MIN_GROUP_SIZE = {"grpo": 2, "rloo": 2, "reinforce_pp": 1}


def group_advantages(rewards: torch.Tensor, group_size: int, *, estimator: str = "grpo", norm_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Per-sequence advantages [S] (fp32) from rewards [S] laid out prompt-major (G consecutive samples per prompt).

    grpo:          (r_i - mean_g r) / (std_g r + eps)   (std is the unbiased sample std, as torch.std; Dr.GRPO: no
                   division when norm_by_std=False)
    rloo:          r_i - mean_{j != i} r_j  (leave-one-out baseline)
    reinforce_pp:  (r_i - mean_batch r) / (std_batch r + eps)  (REINFORCE++: global whitening, no group baseline;
                   callers with per-token whitening pass token-weighted rewards)

    A baseline group without reward spread (all rewards bitwise equal: the prompt's G samples for grpo and rloo, the
    whole batch for reinforce_pp) gets advantage exactly 0.0 for any reward values: the float32 residue of its mean
    (0.35 * 7 / 7 != 0.35) is not a learning signal, and divided by 0 + eps it would be a large one.
    ValueError when group_size is below the estimator's minimum (MIN_GROUP_SIZE: 2 for grpo and rloo) or does not
    divide the number of rewards, and for an unknown estimator.
    """
    if estimator not in MIN_GROUP_SIZE:
        raise ValueError(f"unknown advantage estimator {estimator!r}; valid: {', '.join(MIN_GROUP_SIZE)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < MIN_GROUP_SIZE[estimator]:
        raise ValueError(f"group_size={group_size!r} is invalid for estimator {estimator!r}: it needs an int >= "
                         f"{MIN_GROUP_SIZE[estimator]} (samples per prompt; the trainer's rollout.n)")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    r = rewards.float()
    if estimator == "reinforce_pp":
        if r.numel() < 2 or bool((r == r[0]).all()):
            return torch.zeros_like(r)
        return (r - r.mean()) / (r.std() + eps)
    g = r.view(-1, group_size)  # [P, G]
    if estimator == "grpo":
        adv = g - g.mean(dim=1, keepdim=True)
        if norm_by_std:
            adv = adv / (g.std(dim=1, keepdim=True) + eps)
    else:  # rloo
        adv = g * group_size / (group_size - 1) - g.sum(dim=1, keepdim=True) / (group_size - 1)
    return adv.masked_fill(zero_variance_groups(r, group_size)[:, None], 0.0).reshape(-1)  # no spread: exactly 0


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool [P]: groups whose rewards are all equal (their GRPO advantage is 0: no learning signal)."""
    g = rewards.view(-1, group_size)
    return (g == g[:, :1]).all(dim=1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, global_tokens: float,
                clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float = 10.0,
                entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate summed over the N tokens given and divided by `global_tokens`.

    logp, old_logp, advantages, entropy, ref_logp, is_weights: [N] over the response tokens of this micro-batch.
    Per token, with r = exp(clamp(logp - old_logp, +-20)) and A the advantage:
        l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
        l = min(l, -A c) where A < 0 and c = dual_clip > 0          (dual clip bounds the loss of bad actions)
        l = l * is_weight                                           (truncated importance sampling, optional)
        l = l - entropy_coef * H + kl_coef * k3(ref, new)            (k3 = exp(d) - d - 1, d = clamp(ref - new, +-20),
                                                                      then clamped to [-10, 10])
    loss = sum(l) / global_tokens, so summing the losses of all micro-batches (and ranks) gives the token mean of
    the whole optimizer step. Metrics are sums over the tokens given (divide by global_tokens after reducing).
    """
    log_ratio = logp - old_logp
    ratio = bounded_ratio(log_ratio)
    adv = advantages.to(logp.dtype)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    per_token = clipped
    dual = torch.zeros_like(clipped, dtype=torch.bool)
    if dual_clip > 0:
        dual = (adv < 0) & (clipped > -adv * dual_clip)
        per_token = torch.where(adv < 0, torch.minimum(clipped, -adv * dual_clip), clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    metrics = {
        "pg_loss": per_token.detach().sum(),
        "clip_frac": (loss2 > loss1).float().sum(),
        "dual_clip_frac": dual.float().sum(),
        "approx_kl": (-log_ratio).detach().sum(),
    }
    if entropy is not None:
        metrics["entropy"] = entropy.detach().sum()
        if entropy_coef:
            per_token = per_token - entropy_coef * entropy
    if ref_logp is not None:
        d = (ref_logp - logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        kl = (torch.exp(d) - d - 1.0).clamp(-KL_BOUND, KL_BOUND)
        metrics["kl_ref"] = kl.detach().sum()
        if kl_coef:
            per_token = per_token + kl_coef * kl
    return per_token.sum() / global_tokens, metrics
