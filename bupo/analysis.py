"""Internal-policy analysis (paper Sec. 3, Figs. 2, 3 and 5): entropy flow, boundary layer, layer diagnostics.

Legend: L decoder layers, 0-based index l (paper layer = l + 1); N response-predicting positions; H hidden size;
V vocabulary; E = model.unembedding [V, H]. For a state x [N, H], H(x) is the entropy of softmax(x E^T / T).

States per layer l (DESIGN section 1), from `model.capture`:
    layer_in  = h_{l-1} (the embedding for l = 0)     layer_out = h_l
    attn_in   = input_layernorm_l(h_{l-1})            attn_out  = A_l (o_proj output, before the residual add)
    ffn_in    = post_attention_layernorm_l(h_{l-1} + A_l)   ffn_out = F_l (down_proj output, before the add)
Entropy changes: layer H(h_l) - H(h_{l-1}); attention H(A_l) - H(attn_in); FFN H(F_l) - H(ffn_in).

A response-predicting position is one whose next token is a response token: for a prompt of length p and a
response of length r these are positions p-1 .. p+r-2 of prompt + response, packed by bupo.update.pack as in training.
Means are token-weighted over all such positions of all samples, so the mean change equals the change of means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from bupo import kernels
from bupo.rollout.interface import Rollout
from bupo.update import pack, split_micro_batches

STATES = ("layer_in", "layer_out", "attn_in", "attn_out", "ffn_in", "ffn_out")
DELTAS = {"delta_layer": ("layer_out", "layer_in"), "delta_attn": ("attn_out", "attn_in"),
          "delta_ffn": ("ffn_out", "ffn_in")}
INDEXING = "0-based layer index; paper layer = l + 1"
CAPTURE_BYTES = 2**30  # default budget for the captured states of one micro-batch (sets batch_tokens)


def _validate(samples: Sequence[Rollout], vocab_size: int) -> None:
    for i, s in enumerate(samples):
        if len(s.prompt_ids) == 0:
            raise ValueError(f"samples[{i}]: prompt_ids is empty (the first response token needs a context)")
        for name, ids in (("prompt_ids", s.prompt_ids), ("response_ids", s.response_ids)):
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"samples[{i}].{name}: token ids must be ints in [0, {vocab_size}), got {bad[:5]}")


def _auto_batch_tokens(model) -> int:
    c = model.config
    elem = model.unembedding.element_size()
    per_token = c.num_hidden_layers * len(STATES) * c.hidden_size * elem  # bytes captured per fed token
    return max(256, CAPTURE_BYTES // per_token)


# no_grad, not inference_mode: the trainer may call this on its FSDP2 model (bupo.internal_layer = "auto"), and a layer
# first gathered under inference_mode keeps an inference tensor as its unsharded weight, which breaks the next unshard
@torch.no_grad()
def entropy_flow(model, samples: Sequence[Rollout], *, norm: bool = False, temperature: float = 1.0,
                 batch_tokens: int | None = None, progress: Callable[[int, int], None] | None = None,
                 vocab_size: int | None = None) -> dict:
    """Token-weighted mean entropies of softmax(x E^T / T) per layer for the six states, and the entropy changes.

    samples: rollouts (prompt_ids, response_ids); samples with an empty response contribute nothing.
    norm: apply the final norm (model.model.norm) to every state before the unembedding (paper ablation).
    batch_tokens: packed tokens (prompt + response) per micro-batch (bupo.update.split_micro_batches); default from
    a 1 GiB budget for the captured states (L * 6 * H values per token). Only the response-predicting rows are
    kept, and entropies go through kernels.linear_entropy_many (chunked over rows and V): no [L, N, V] tensor, no
    [N, V] beyond its chunk.
    progress: optional callable(done_samples, total_samples) called after each micro-batch.
    vocab_size: the policies are softmaxes over the first vocab_size unembedding rows (the tokenizer's ids, as the
    trained policy and the samplers; None: every row, also padded ones).

    Returns {layer_in, layer_out, attn_in, attn_out, ffn_in, ffn_out, delta_layer, delta_attn, delta_ffn}
    (lists of L floats, nats) plus num_layers, num_tokens, num_samples, norm, temperature, vocab_size (the rows
    used), boundary_layer (see `boundary_layer`; None when no layer has a positive mean FFN change) and indexing.
    """
    L = model.config.num_hidden_layers
    _validate(samples, model.config.vocab_size)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; must be > 0")
    if vocab_size is not None and not 1 <= vocab_size <= model.config.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is invalid: the model has {model.config.vocab_size} embedding rows")
    answered = [s for s in samples if s.response_ids]
    groups = split_micro_batches(answered, batch_tokens or _auto_batch_tokens(model))
    if not groups:
        raise ValueError("entropy_flow: no response tokens in the samples (every response_ids is empty)")
    device = model.model.embed_tokens.weight.device
    sums = torch.zeros(len(STATES), L, dtype=torch.float64, device=device)  # [6, L]
    count, done = 0, 0
    for group in groups:
        packed = pack([answered[i] for i in group], device)
        pos = packed.resp_pos  # [n] the response-predicting positions
        caps = model.capture(packed.input_ids, cu_seqlens=packed.cu_seqlens)  # L dicts of [1, total, H]
        # [V, H], read after the forward: under FSDP2 the root is gathered only then
        E = model.unembedding[:vocab_size]
        # layer_in of layer l > 0 is layer_out of l - 1: only the embedding (layer_in of layer 0) is extra.
        xs = [caps[0]["layer_in"][0, pos]] + [caps[l][s][0, pos] for s in STATES[1:] for l in range(L)]
        del caps
        if norm:
            xs = [model.model.norm(x) for x in xs]
        ents = kernels.linear_entropy_many(xs, E, temperature=temperature)  # (1 + 5L) x [n] fp32
        tot = torch.stack([e.double().sum() for e in ents])  # [1 + 5L]
        sums[1:] += tot[1:].view(len(STATES) - 1, L)
        sums[0, 0] += tot[0]
        sums[0, 1:] += tot[1:L]
        count += pos.numel()
        done += len(group)
        if progress is not None:
            progress(done, len(samples))
    means = (sums / count).tolist()
    flow: dict = {s: means[j] for j, s in enumerate(STATES)}
    for name, (a, b) in DELTAS.items():
        flow[name] = [x - y for x, y in zip(flow[a], flow[b])]
    flow.update(num_layers=L, num_tokens=count, num_samples=len(answered), norm=norm, temperature=temperature,
                vocab_size=vocab_size or model.config.vocab_size, indexing=INDEXING)
    flow["boundary_layer"] = boundary_layer(flow) if any(d > 0 for d in flow["delta_ffn"]) else None
    return flow


def boundary_layer(flow_or_ffn_delta: dict | Sequence[float]) -> int:
    """The paper's rule for k: the last layer (0-based) whose mean FFN entropy change is > 0.

    Accepts an `entropy_flow` dict (its delta_ffn) or the per-layer FFN changes themselves.
    Raises ValueError when no layer has a positive change (there is no boundary to pick; choose k by hand),
    when the curve is empty, or when it holds a non-finite value.
    """
    d = flow_or_ffn_delta["delta_ffn"] if isinstance(flow_or_ffn_delta, dict) else flow_or_ffn_delta
    d = [float(x) for x in d]
    if not d:
        raise ValueError("boundary_layer: empty FFN entropy-change curve")
    if not all(math.isfinite(x) for x in d):
        raise ValueError(f"boundary_layer: non-finite FFN entropy change in {d}")
    pos = [l for l, x in enumerate(d) if x > 0]
    if not pos:
        raise ValueError(f"boundary_layer: no layer has a positive mean FFN entropy change (max {max(d):.4g}); "
                         "set the internal layer by hand")
    return pos[-1]


# --- paper Fig. 5 diagnostics ---------------------------------------------------------------------------------------

# no_grad, not inference_mode: the trainer calls this on its FSDP2 model, and a layer first gathered under
# inference_mode would get an inference tensor as its unsharded weight, which FSDP2 cannot reuse afterwards
@torch.no_grad()
def layer_diagnostics(model, input_ids: torch.Tensor, k: int, *, cu_seqlens: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, temperature: float = 1.0, chunk_rows: int = 1024,
                      vocab_size: int | None = None) -> dict:
    """Per later layer l > k, on a probe batch: mean cosine similarity cos(h_k, h_l) and mean KL(pi^k || pi^l),
    with pi^l = softmax(h_l E^T / T) (raw residuals, no final norm). Also the final policy as "final".

    input_ids [B, T] (or [1, N] with cu_seqlens); mask [B, T] bool selects the positions to average (all by
    default). Logits are built chunk_rows rows at a time: peak [chunk_rows, V] per policy. vocab_size: the
    policies are softmaxes over the first vocab_size unembedding rows (the tokenizer's ids; None: all rows).
    Returns {"layers": [k+1 .. L-1], "cos": [...], "kl": [...], "cos_final": float, "kl_final": float,
    "num_tokens": int}.
    """
    L = model.config.num_hidden_layers
    if not 0 <= k < L:
        raise ValueError(f"k={k}; must be in [0, {L - 1}]")
    caps = model.capture(input_ids, cu_seqlens=cu_seqlens, keys=("layer_out",))
    sel = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device) if mask is None else mask.bool()
    hs = [c["layer_out"][sel] for c in caps]  # L x [n, H]
    later = hs[k + 1:] + [model.model.norm(hs[-1])]
    E = model.unembedding[:vocab_size]  # [V, H] (every row when vocab_size is None)
    cos = [F.cosine_similarity(hs[k].float(), h.float(), dim=-1).mean().item() for h in later]
    kl = [0.0] * len(later)
    n = hs[k].shape[0]
    if n == 0:
        raise ValueError("layer_diagnostics: the mask selects no positions")
    # fp32 logits, never rounded to bf16 (in a bf16 model a bf16 product would round them by up to ~0.06); a 16-bit
    # head on a CPU is upcast once here, not in every product
    E32 = kernels.products.weight_fp32(E)
    for s in range(0, n, chunk_rows):
        logp_k = F.log_softmax(kernels.fp32_logits(hs[k][s:s + chunk_rows], E, weight_fp32=E32) / temperature,
                               dim=-1)  # [c, V]
        for j, h in enumerate(later):
            logp_l = F.log_softmax(kernels.fp32_logits(h[s:s + chunk_rows], E, weight_fp32=E32) / temperature,
                                   dim=-1)  # [c, V]
            kl[j] += (logp_k.exp() * (logp_k - logp_l)).sum().item()
    kl = [x / n for x in kl]
    return {"layers": list(range(k + 1, L)), "cos": cos[:-1], "kl": kl[:-1], "cos_final": cos[-1],
            "kl_final": kl[-1], "num_tokens": n}
