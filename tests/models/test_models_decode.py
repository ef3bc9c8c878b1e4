"""KV-cache decoding (the built-in sampler's path) against the plain forward of each sequence."""

import pytest
import torch
from torch.testing import assert_close

PROMPT_LENS = [4, 7, 2]
NEW = 4


def _batch(vocab: int):
    """Left-padded prompts, their continuations, key mask and position ids for the prompt chunk."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=g) for n in PROMPT_LENS]
    cont = torch.randint(0, vocab, (len(PROMPT_LENS), NEW), generator=g)
    P = max(PROMPT_LENS)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    key_mask = torch.zeros(len(prompts), P + NEW, dtype=torch.bool)
    pos = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = p
        key_mask[b, P - len(p) :] = True
        pos[b, P - len(p) :] = torch.arange(len(p))
    return prompts, cont, ids, key_mask, pos


@pytest.mark.parametrize("layer", [None, 1])
@torch.no_grad()
def test_left_padded_prefill_then_token_by_token_equals_forward(pair, layer):
    ours, _ = pair
    prompts, cont, ids, key_mask, pos = _batch(ours.config.vocab_size)
    B, P = ids.shape
    n_layers = None if layer is None else layer + 1
    cache = ours.new_cache(B, P + NEW, num_layers=n_layers)
    assert cache.num_layers == (ours.config.num_hidden_layers if layer is None else layer + 1)
    outs = [ours.decode(ids, pos, cache, 0, key_mask[:, :P], layer=layer)]
    for t in range(NEW):
        step_pos = torch.tensor([len(p) + t for p in prompts])[:, None]
        outs.append(ours.decode(cont[:, t : t + 1], step_pos, cache, P + t, key_mask[:, : P + t + 1], layer=layer))
    got = torch.cat(outs, dim=1)  # [B, P + NEW, H]
    for b, p in enumerate(prompts):
        full = torch.cat([p, cont[b]])[None]
        ref = ours.hidden_states(full, layer)
        assert_close(got[b : b + 1, P - len(p) :], ref)


@torch.no_grad()
def test_chunked_prefill_is_causal_inside_the_chunk(pair):
    ours, _ = pair
    prompts, cont, ids, key_mask, pos = _batch(ours.config.vocab_size)
    B, P = ids.shape
    cache = ours.new_cache(B, P + NEW)
    ours.decode(ids, pos, cache, 0, key_mask[:, :P])
    cont_pos = torch.tensor([len(p) for p in prompts])[:, None] + torch.arange(NEW)  # [B, NEW]
    got = ours.decode(cont, cont_pos, cache, P, key_mask, layer=None)  # all NEW tokens in one chunk
    for b, p in enumerate(prompts):
        ref = ours.hidden_states(torch.cat([p, cont[b]])[None], None)
        assert_close(got[b : b + 1], ref[:, len(p) :])


@torch.no_grad()
def test_decode_logits_match_transformers(pair):
    ours, hf = pair
    prompts, cont, ids, key_mask, pos = _batch(ours.config.vocab_size)
    B, P = ids.shape
    cache = ours.new_cache(B, P + 1)
    ours.decode(ids, pos, cache, 0, key_mask[:, :P])
    step_pos = torch.tensor([len(p) for p in prompts])[:, None]
    logits = ours.decode(cont[:, :1], step_pos, cache, P, key_mask[:, : P + 1]) @ ours.unembedding.T
    for b, p in enumerate(prompts):
        ref = hf(torch.cat([p, cont[b, :1]])[None]).logits[:, -1]
        assert_close(logits[b], ref)


def test_cache_checks(pair):
    ours, _ = pair
    L = ours.config.num_hidden_layers
    with pytest.raises(ValueError, match="num_layers"):
        ours.new_cache(1, 8, num_layers=L + 1)
    cache = ours.new_cache(1, 4, num_layers=1)
    assert cache.k[0].shape == (1, 4, ours.config.num_key_value_heads, ours.config.head_dim)
    assert cache.k[0].dtype == ours.unembedding.dtype
    ids, pos, mask = torch.zeros(1, 2, dtype=torch.long), torch.arange(2)[None], torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="cache layers"):
        ours.decode(ids, pos, cache, 0, mask, layer=1)
    with pytest.raises(ValueError, match="overflow"):
        ours.decode(ids, pos + 3, cache, 3, torch.ones(1, 5, dtype=torch.bool), layer=0)
    with pytest.raises(ValueError, match="key_mask"):
        ours.decode(ids, pos, cache, 0, torch.ones(1, 1, dtype=torch.bool), layer=0)
    # a full-cache mask is accepted: only its first start + t columns matter
    full = ours.decode(ids, pos, ours.new_cache(1, 4, num_layers=1), 0, torch.ones(1, 4, dtype=torch.bool), layer=0)
    assert_close(full, ours.hidden_states(ids, layer=0))
