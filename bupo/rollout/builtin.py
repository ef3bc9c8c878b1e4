"""The built-in batched sampler: our own modules with a KV cache (CPU, laptops, one-GPU debugging).

    engine = BuiltinEngine(model, max_batch_size=64)
    samples = engine.generate(prompt_ids, SamplingParams(n=8, max_new_tokens=512, stop_token_ids=tok.stop_token_ids))
    engine.update_weights(model.named_parameters())     # HF names, full tensors

`bupo.rollout.vllm_engine` implements the same `Engine` protocol (bupo.rollout.interface) on vLLM. With `layer=k`
this engine samples from the internal policy pi^k = softmax(h_k E^T / T) of the paper (decoder layers above k never
run and are not cached).

How one batch of at most `max_batch_size` sequences is generated:
1. prefill: each distinct prompt of the batch runs once, left-padded to the longest one (pad slots are masked out,
   positions count real tokens only); its K/V rows are copied to the cache rows of its n samples;
2. decode: one token per row per step, logits [B, V] only for that token; rows that hit a stop id are dropped from
   the batch (their cache rows are compacted away) once at least a quarter of the batch has finished.
Randomness: every sequence owns a torch.Generator seeded from (seed, prompt index, sample index) that draws its
uniforms once, up front; a token is the inverse CDF of the sampled distribution at that uniform, so the same logits
at any batch position give the same token (`sample_tokens` is row-wise). The logits themselves are not
batch-invariant: another batch composition (other prompts beside it, another padding, another `max_batch_size`)
changes the matrix shapes of the forward, hence its float rounding in the last bits, and a uniform that falls within
that rounding of a CDF boundary picks the neighbouring token. Equal samples across batch compositions are therefore
typical, not guaranteed; what is guaranteed is equal uniforms and, for equal logits, equal tokens.

Legend: B sequences in a batch, U distinct prompts in it, P longest prompt, N max_new_tokens, H hidden, V vocab,
C the model's context (max_position_embeddings): a prompt of P tokens needs P + N <= C, else a ValueError.
"""

from collections.abc import Iterable

import torch

from bupo.kernels.products import fp32_logits, weight_fp32
from bupo.rollout.interface import Rollout, SamplingParams


def _nucleus_candidates(x: torch.Tensor, lse: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens of every row, sorted descending, enough of them to hold mass top_p: x [B, V] ->
    (values [B, K], ids [B, K]). Tries the top 64, then the top 1024, before a full sort (a sort of [B, V] costs
    about as much as a decode step of a small model on a CPU); exact, since every nucleus token is among them."""
    for K in (64, 1024):
        if K >= x.shape[-1]:
            break
        vals, idx = x.topk(K, dim=-1)  # [B, K], sorted descending
        if bool(((vals - lse).exp().sum(-1) >= top_p).all()):
            return vals, idx
    return x.sort(dim=-1, descending=True)


def sample_tokens(
    logits: torch.Tensor, u: torch.Tensor, params: SamplingParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row. logits [B, V] fp32 (untempered), u [B] uniforms in [0, 1) -> token [B] int64,
    logp [B] fp32.

    temperature > 0: logp is the log-softmax of logits / T after top-k and top-p, i.e. of the distribution
    sampled from, and the token is its inverse CDF at u (over tokens in vocab order, or in descending order when
    filtering). temperature == 0 (greedy): token = argmax, logp is the log-softmax of the raw (T = 1, unfiltered)
    logits at it.
    """
    if params.temperature == 0:
        tok = logits.argmax(-1)  # [B]
        return tok, logits.gather(-1, tok[:, None])[:, 0] - logits.logsumexp(-1)
    x = logits if params.temperature == 1 else logits / params.temperature  # [B, V]
    idx = None
    if 0 < params.top_k < x.shape[-1]:
        x, idx = x.topk(params.top_k, dim=-1)  # [B, k], sorted descending
    lse = x.logsumexp(-1, keepdim=True)  # [B, 1]
    if params.top_p < 1:
        if idx is None:
            x, idx = _nucleus_candidates(x, lse, params.top_p)
        p = (x - lse).exp()  # sorted descending: drop a token once the mass before it reaches top_p
        x = x.masked_fill(p.cumsum(-1) - p >= params.top_p, float("-inf"))  # the first token always stays
        lse = x.logsumexp(-1, keepdim=True)
    cdf = (x - lse).exp().cumsum(-1)  # [B, W]
    total = cdf[:, -1:]
    j = torch.searchsorted(cdf, u[:, None] * total, right=True)  # [B, 1]
    last = (cdf < total).sum(-1, keepdim=True)  # last token with mass > 0: guards u * total rounding up to total
    j = torch.minimum(j, last)
    tok = j if idx is None else idx.gather(-1, j)
    return tok[:, 0], (x.gather(-1, j) - lse)[:, 0]


class BuiltinEngine:
    """Batched generation on our own model (models.Qwen3ForCausalLM / LlamaForCausalLM) with a KV cache, in the
    model's dtype and on its device. See the module docstring for the algorithm.

    vocab_size: the tokenizer's real vocabulary. When the checkpoint pads its embedding (Qwen: 151669 tokens of
    151936 rows), only the first vocab_size rows of the unembedding form the sampling distribution, as in the vLLM
    engine; None samples over every row."""

    def __init__(self, model: torch.nn.Module, *, max_batch_size: int = 64, vocab_size: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        rows = model.config.vocab_size
        if vocab_size is not None and not 1 <= vocab_size <= rows:
            raise ValueError(f"vocab_size={vocab_size} is invalid: the model has {rows} embedding rows")
        self.model = model
        self.max_batch_size = max_batch_size
        self.vocab_size = rows if vocab_size is None else vocab_size
        self._head32: torch.Tensor | None = None  # the head upcast to fp32 during a generate call (bf16 on a CPU)

    # --- the Engine protocol

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        params.check_prompts(len(prompts))
        self._check(prompts, params)
        seqs = [(p, s) for p in range(len(prompts)) for s in range(params.n)]  # prompt-major
        out: list[Rollout] = []
        head = self.model.unembedding[: self.vocab_size]
        self._head32 = weight_fp32(head)  # once per call, not per decode step (weights change between calls)
        try:
            for i in range(0, len(seqs), self.max_batch_size):
                out += self._generate_batch(prompts, seqs[i : i + self.max_batch_size], params)
        finally:
            self._head32 = None
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full tensors into the model by HF name (a tied head is one Parameter under both names)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, t in named_tensors:
                if name not in params:
                    raise ValueError(f"update_weights: unknown parameter name {name!r} for this model")
                p = params[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"update_weights: {name!r} has shape {tuple(t.shape)}, model has {tuple(p.shape)}")
                p.copy_(t)

    def sleep(self) -> None:
        """No-op: the built-in engine shares the trainer's device and keeps no memory between calls."""

    def wake_up(self) -> None:
        """No-op (see sleep)."""

    # --- internals

    def _check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        V, L = self.model.config.vocab_size, self.model.config.num_hidden_layers
        C = self.model.config.max_position_embeddings
        if params.layer is not None and not (isinstance(params.layer, int) and 0 <= params.layer < L):
            raise ValueError(f"SamplingParams.layer must be None or in [0, {L - 1}], got {params.layer!r}")
        for i, ids in enumerate(prompts):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
            if min(ids) < 0 or max(ids) >= V:
                raise ValueError(f"prompt {i} has token ids outside [0, {V}) (vocab_size of the model)")
        i = max(range(len(prompts)), key=lambda j: len(prompts[j]), default=None)  # the longest prompt
        if i is not None and len(prompts[i]) + params.max_new_tokens > C:  # entry points check first; last defence
            raise ValueError(f"prompt {i} has {len(prompts[i])} tokens: with SamplingParams.max_new_tokens="
                             f"{params.max_new_tokens} its sequence would exceed the model's context, "
                             f"max_position_embeddings={C}")

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, H] (the last position only) -> fp32 logits [B, V] through the first V = vocab_size rows of the
        unembedding (a contiguous view: padded rows are never computed, so they can never be sampled). In a bf16
        model the products accumulate in fp32 and the logits are never rounded to bf16 (kernels.fp32_logits, with
        the head upcast once per generate call on a CPU), as the trainer's log-probs."""
        return fp32_logits(h, self.model.unembedding[: self.vocab_size], weight_fp32=self._head32)

    def _prefill(self, prompts: list[list[int]], seqs: list[tuple[int, int]], params: SamplingParams, N: int):
        """Run every distinct prompt of the batch once, left-padded to the longest (P), and copy its K/V to the
        cache rows of its samples. Returns the cache (P + N - 1 slots), logits [B, V] of each row's last prompt
        token, key_mask [B, P + N - 1] (False on pad slots) and the position of each row's first new token [B]."""
        m, dev = self.model, self.model.unembedding.device
        uniq = list(dict.fromkeys(p for p, _ in seqs))  # distinct prompts, in order
        lens = torch.tensor([len(prompts[p]) for p in uniq])  # [U]
        P = int(lens.max())
        row_of = {p: r for r, p in enumerate(uniq)}
        rows = torch.tensor([row_of[p] for p, _ in seqs], device=dev)  # [B] distinct-prompt row of each sequence
        ids = torch.zeros(len(uniq), P, dtype=torch.long)  # [U, P], pads are token 0 (masked out)
        for r, p in enumerate(uniq):
            ids[r, P - len(prompts[p]) :] = torch.tensor(prompts[p])
        slot = torch.arange(P) - (P - lens)[:, None]  # [U, P] position of the token in each slot, < 0 on pads
        prompt_mask = (slot >= 0).to(dev)  # [U, P]
        num_layers = None if params.layer is None else params.layer + 1  # layer=k needs (and fills) k+1 layers
        pre = m.new_cache(len(uniq), P, num_layers=num_layers)
        h = m.decode(ids.to(dev), slot.clamp(min=0).to(dev), pre, 0, prompt_mask, layer=params.layer,
                     norm=params.norm)  # [U, P, H]
        logits = self._logits(h[:, -1])[rows]  # [B, V]
        cache = m.new_cache(len(seqs), P + N - 1, num_layers=num_layers)  # the last new token is never fed back
        for l in range(cache.num_layers):
            cache.k[l][:, :P] = pre.k[l][rows]
            cache.v[l][:, :P] = pre.v[l][rows]
        key_mask = torch.ones(len(seqs), P + N - 1, dtype=torch.bool, device=dev)  # [B, P + N - 1]
        key_mask[:, :P] = prompt_mask[rows]
        return cache, logits, key_mask, lens.to(dev)[rows]

    def _generate_batch(self, prompts: list[list[int]], seqs: list[tuple[int, int]], params: SamplingParams):
        m, dev = self.model, self.model.unembedding.device
        B, N = len(seqs), params.max_new_tokens
        cache, logits, key_mask, next_pos = self._prefill(prompts, seqs, params, N)
        P = key_mask.shape[1] - N + 1
        # per-sequence randomness, drawn up front on the CPU so it does not depend on the batch or device
        u = torch.stack([torch.rand(N, generator=torch.Generator().manual_seed(params.sample_seed(p, s)))
                         for p, s in seqs]).to(dev)  # [B, N] fp32 in [0, 1)
        stop = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=dev)
        tokens = torch.zeros(B, N, dtype=torch.long, device=dev)  # [B, N]
        logps = torch.zeros(B, N, dtype=torch.float32, device=dev)  # [B, N]
        n_new = torch.full((B,), N, dtype=torch.long, device=dev)  # [B] response length of each sequence
        stopped = torch.zeros(B, dtype=torch.bool, device=dev)  # [B] ended on a stop id
        live = torch.arange(B, device=dev)  # [b] which sequences the current batch rows are
        done = torch.zeros(B, dtype=torch.bool, device=dev)  # [b] finished rows of the current batch
        for i in range(N):
            tok, lp = sample_tokens(logits, u[live, i], params)  # [b], [b]
            tokens[live, i], logps[live, i] = tok, lp
            hit = torch.isin(tok, stop) & ~done
            n_new[live[hit]] = i + 1
            stopped[live[hit]] = True
            done |= hit
            n_done = int(done.sum())
            if i == N - 1 or n_done == len(live):
                break
            if n_done * 4 >= len(live):  # compact: drop finished rows from the batch and from the cache
                keep = (~done).nonzero()[:, 0]
                live, tok, next_pos, key_mask, done = live[keep], tok[keep], next_pos[keep], key_mask[keep], done[keep]
                for l in range(cache.num_layers):
                    cache.k[l], cache.v[l] = cache.k[l][keep], cache.v[l][keep]
            h = m.decode(tok[:, None], (next_pos + i)[:, None], cache, P + i, key_mask[:, : P + i + 1],
                         layer=params.layer, norm=params.norm)  # [b, 1, H]
            logits = self._logits(h[:, 0])  # [b, V]
        tokens, logps, n_new, stopped = tokens.tolist(), logps.tolist(), n_new.tolist(), stopped.tolist()
        return [
            Rollout(list(prompts[p]), tokens[b][: n_new[b]], logps[b][: n_new[b]], stopped[b], p, s)
            for b, (p, s) in enumerate(seqs)
        ]


__all__ = ["BuiltinEngine", "sample_tokens"]
