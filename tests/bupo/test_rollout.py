"""Built-in sampler: KV-cache decoding against a no-cache reference (a full forward over the growing sequence at
every step), seeds, stop ids, log-probs, top-k/top-p, internal-policy sampling, weight updates."""

import pytest
import torch

from bupo import models
from bupo.rollout import builtin
from bupo.rollout.builtin import BuiltinEngine, sample_tokens
from bupo.rollout.interface import Engine, SamplingParams

# initializer_range 0.2 makes the tiny models' next-token distributions peaked (top-2 logit gaps ~1e-2, far above
# the ~1e-6 difference between cached and uncached decoding), so greedy comparisons are exact.
CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.2),
    "qwen3": dict(model_type="qwen3", vocab_size=103, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=24, max_position_embeddings=256,
                  rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2),
}
LENS = (3, 7, 1, 12)  # prompts of different lengths -> left padding in one batch
SAMPLE = dict(temperature=1.0, top_p=0.9, top_k=20, n=3, max_new_tokens=10, seed=5)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return models.build_model(CONFIGS[request.param], seed=1)


@pytest.fixture(scope="module")
def prompts(model):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in LENS]


@torch.no_grad()
def policy_logits(model, ids: list[int], layer=None, norm=False) -> torch.Tensor:
    """No-cache reference: logits [T, V] of a full forward over `ids` (internal policy h_k E^T when layer=k)."""
    x = torch.tensor([ids])
    if layer is None:
        return model(x)[0].float()
    return (model.hidden_states(x, layer=layer, norm=norm)[0] @ model.unembedding.T).float()


def reference_greedy(model, prompt, max_new, stop=(), layer=None, norm=False) -> list[int]:
    ids = list(prompt)
    for _ in range(max_new):
        ids.append(int(policy_logits(model, ids, layer, norm)[-1].argmax()))
        if ids[-1] in stop:
            break
    return ids[len(prompt):]


def test_engine_protocol(model):
    assert isinstance(BuiltinEngine(model), Engine)


def test_greedy_matches_no_cache_reference(model, prompts):
    out = BuiltinEngine(model).generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
    assert [(s.prompt_index, s.sample_index) for s in out] == [(i, 0) for i in range(len(prompts))]
    for s, p in zip(out, prompts):
        assert s.prompt_ids == p
        assert s.response_ids == reference_greedy(model, p, 12)
        assert not s.finished  # hit max_new_tokens
        # greedy log-probs are those of the raw (T = 1) distribution
        ref = policy_logits(model, p + s.response_ids).log_softmax(-1)[len(p) - 1 : -1]
        want = ref.gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-5, rtol=1e-5)


def _draws(monkeypatch) -> dict[float, tuple[torch.Tensor, int]]:
    """Records every row that sample_tokens sees: its uniform -> (its logits row, the token drawn). A uniform belongs
    to one (sequence, step), so it keys the same draw across runs."""
    seen, real = {}, builtin.sample_tokens

    def spy(logits, u, params):
        tok, lp = real(logits, u, params)
        seen.update({ui: (row.clone(), ti) for row, ui, ti in zip(logits, u.tolist(), tok.tolist())})
        return tok, lp

    monkeypatch.setattr(builtin, "sample_tokens", spy)
    return seen


def test_seeded_sampling_reproducible_and_batch_independent(model, prompts, monkeypatch):
    p = SamplingParams(**SAMPLE)
    base = BuiltinEngine(model).generate(prompts, p)
    assert [(s.prompt_index, s.sample_index) for s in base] == [(i, j) for i in range(4) for j in range(3)]
    assert len({tuple(s.response_ids) for s in base}) > 6  # samples differ from each other
    again = BuiltinEngine(model).generate(prompts, p)  # the same batches: bitwise the same
    assert [s.response_ids for s in again] == [s.response_ids for s in base]
    assert all(a.logprobs == b.logprobs for a, b in zip(again, base))
    # Alone (max_batch_size=1) a sequence's computation does not depend on the other prompts: bitwise equal samples
    # whatever else is generated in the same call (other padding, other prompts, another position).
    alone = BuiltinEngine(model, max_batch_size=1).generate(prompts, p)
    swapped = [prompts[2], prompts[3][:2], prompts[0], [5] * 20]
    other = BuiltinEngine(model, max_batch_size=1).generate(swapped, SamplingParams(**SAMPLE, seed_index=(2, 9, 0, 8)))
    for i, j in ((0, 2), (2, 0)):
        mine, theirs = alone[3 * i: 3 * i + 3], other[3 * j: 3 * j + 3]
        assert [s.response_ids for s in theirs] == [s.response_ids for s in mine]
        assert all(a.logprobs == b.logprobs for a, b in zip(theirs, mine))
    # Batched differently, a sequence draws the same uniforms; wherever its logits row came out bitwise equal, so did
    # its token (the rows of the same uniform). Equal rows are not guaranteed across matrix shapes, so equal responses
    # are typical, not asserted.
    ref = _draws(monkeypatch)
    BuiltinEngine(model).generate(prompts, p)
    for mbs in (1, 4):
        seen = _draws(monkeypatch)
        out = BuiltinEngine(model, max_batch_size=mbs).generate(prompts, p)
        first = {float(u[0]) for u in _uniforms(p, len(prompts))}
        assert first <= seen.keys() and first <= ref.keys()  # every sequence's first draw, in both runs
        for u in seen.keys() & ref.keys():
            if torch.equal(seen[u][0], ref[u][0]):
                assert seen[u][1] == ref[u][1]
        for a, b in zip(out, base):
            if a.response_ids == b.response_ids:
                torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
    reseeded = BuiltinEngine(model).generate(prompts, SamplingParams(**{**SAMPLE, "seed": 6}))
    assert [s.response_ids for s in reseeded] != [s.response_ids for s in base]


def _uniforms(p: SamplingParams, num_prompts: int) -> list[torch.Tensor]:
    """The uniforms of every sequence, prompt-major: what the engine draws from its own generator."""
    return [torch.rand(p.max_new_tokens, generator=torch.Generator().manual_seed(p.sample_seed(i, j)))
            for i in range(num_prompts) for j in range(p.n)]


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                    dict(temperature=1.3, top_p=0.8), dict(temperature=0)])
def test_the_same_logits_give_the_same_draw_at_any_batch_position(params):
    """The exact part of batch independence: sample_tokens is row-wise, so a row of logits and its uniform give
    bitwise the same token and log-prob at any position of a batch of any size."""
    g = torch.Generator().manual_seed(0)
    row, u = torch.randn(1, 1000, generator=g) * 3, torch.rand(1, generator=g)
    want_tok, want_lp = sample_tokens(row, u, SamplingParams(**params))
    for B, pos in ((2, 1), (7, 0), (7, 4), (33, 32)):
        logits, us = torch.randn(B, 1000, generator=g) * 3, torch.rand(B, generator=g)
        logits[pos], us[pos] = row[0], u[0]
        tok, lp = sample_tokens(logits, us, SamplingParams(**params))
        assert tok[pos] == want_tok[0] and torch.equal(lp[pos], want_lp[0]), (B, pos)


def test_stop_ids_end_responses(model, prompts):
    ref = [reference_greedy(model, p, 12) for p in prompts]
    stop = (ref[0][2], ref[3][4])  # two ids greedy produces: rows stop at different steps (batch compaction)
    out = BuiltinEngine(model).generate(prompts, SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=stop))
    n_stopped = 0
    for s, r in zip(out, ref):
        cut = next((j + 1 for j, t in enumerate(r) if t in stop), None)
        assert s.response_ids == (r if cut is None else r[:cut])
        assert s.finished == (cut is not None)
        assert len(s.logprobs) == len(s.response_ids)
        n_stopped += s.finished
    assert n_stopped >= 2


def test_max_new_tokens_truncates(model, prompts):
    out = BuiltinEngine(model).generate(prompts, SamplingParams(n=2, max_new_tokens=5, seed=1))
    assert all(len(s.response_ids) == 5 and len(s.logprobs) == 5 and not s.finished for s in out)


@pytest.mark.parametrize("temperature,layer", [(1.0, None), (0.7, None), (1.0, 1)])
def test_logprobs_match_full_forward(model, prompts, temperature, layer):
    p = SamplingParams(n=2, temperature=temperature, max_new_tokens=8, seed=3, layer=layer)
    for s in BuiltinEngine(model).generate(prompts, p):
        ids = prompts[s.prompt_index]
        logits = policy_logits(model, ids + s.response_ids, layer)[len(ids) - 1 : -1] / temperature
        want = logits.log_softmax(-1).gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("filt", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=5, top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_equal_greedy(model, prompts, filt):
    eng = BuiltinEngine(model)
    greedy = eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8))
    out = eng.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, n=2, **filt))
    for s in out:
        assert s.response_ids == greedy[s.prompt_index].response_ids
        assert s.logprobs == [0.0] * 8  # a one-token distribution


def test_internal_policy_last_layer_with_norm_equals_full_policy(model, prompts):
    eng, L = BuiltinEngine(model), model.config.num_hidden_layers
    p = SamplingParams(n=2, max_new_tokens=10, seed=11, top_p=0.95)
    full = eng.generate(prompts, p)
    internal = eng.generate(prompts, SamplingParams(**{**p.__dict__, "layer": L - 1, "norm": True}))
    assert [s.response_ids for s in internal] == [s.response_ids for s in full]
    for a, b in zip(internal, full):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layer,norm", [(0, False), (1, False), (1, True)])
def test_internal_policy_greedy_matches_hidden_states_reference(model, prompts, layer, norm):
    p = SamplingParams(temperature=0, max_new_tokens=8, layer=layer, norm=norm)
    out = BuiltinEngine(model).generate(prompts, p)
    for s, p in zip(out, prompts):
        assert s.response_ids == reference_greedy(model, p, 8, layer=layer, norm=norm)


def test_update_weights(model, prompts):
    other = models.build_model(model.config.to_hf_dict(), seed=2)
    eng = BuiltinEngine(models.build_model(model.config.to_hf_dict(), seed=1))
    p = SamplingParams(temperature=0, max_new_tokens=8)
    before = [s.response_ids for s in eng.generate(prompts, p)]
    eng.update_weights(other.named_parameters())
    after = [s.response_ids for s in eng.generate(prompts, p)]
    assert after != before
    assert after == [s.response_ids for s in BuiltinEngine(other).generate(prompts, p)]
    # a subset by HF name (the head alone, tied or not)
    eng.update_weights([("lm_head.weight", torch.zeros_like(model.lm_head.weight))])
    assert torch.equal(eng.model.unembedding, torch.zeros_like(model.lm_head.weight))
    with pytest.raises(ValueError, match="model.layers.99.mlp.up_proj.weight"):
        eng.update_weights([("model.layers.99.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights([("model.norm.weight", torch.zeros(3))])


@pytest.mark.parametrize("bad", [dict(n=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2),
                                 dict(max_new_tokens=0), dict(layer=3)])
def test_bad_params_raise(model, prompts, bad):
    with pytest.raises(ValueError):
        BuiltinEngine(model).generate(prompts, SamplingParams(**bad))


def test_bad_prompts_raise(model):
    with pytest.raises(ValueError, match="empty"):
        BuiltinEngine(model).generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        BuiltinEngine(model).generate([[1, model.config.vocab_size]], SamplingParams())


def test_sample_tokens_inverse_cdf_edges():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), 0.0]])
    p = SamplingParams()
    # u just below 1 picks the last token with mass, never a -inf one
    assert sample_tokens(logits, torch.tensor([1 - 2**-24]), p)[0].item() == 3
    assert sample_tokens(logits, torch.tensor([0.0]), p)[0].item() == 0
    tok, lp = sample_tokens(logits, torch.tensor([0.5]), p)
    assert tok.item() == 1 and lp.item() == pytest.approx(-torch.log(torch.tensor(3.0)).item())


@pytest.mark.parametrize("scale", [8.0, 2.0, 0.05])  # nucleus inside the top 64, inside the top 1024, full sort
def test_top_p_samples_from_the_nucleus(scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 3000, generator=g) * scale  # [B, V]
    u = torch.rand(8, generator=g)
    tok, lp = sample_tokens(logits, u, SamplingParams(temperature=0.9, top_p=0.8))
    x = logits / 0.9
    xs, idx = x.sort(-1, descending=True)
    pr = xs.softmax(-1)
    keep = pr.cumsum(-1) - pr < 0.8  # the smallest prefix of mass >= 0.8
    for r in range(8):
        nucleus = idx[r][keep[r]]
        assert tok[r] in nucleus
        want = x[r][nucleus].log_softmax(-1)[nucleus == tok[r]][0]
        torch.testing.assert_close(lp[r], want, atol=1e-5, rtol=1e-5)


def test_sampling_is_masked_to_the_real_vocabulary(model, prompts):
    """A padded embedding (more rows than tokenizer ids) is never sampled, and the log-probs are those of the
    distribution over the real ids only, as with the vLLM engine's mask."""
    V = model.config.vocab_size - 7
    loud = models.build_model(model.config.to_hf_dict(), seed=1)
    with torch.no_grad():
        loud.unembedding[V:] = 50 * loud.unembedding[V:].sign()  # padded rows would dominate an unmasked softmax
    assert any(i >= V for s in BuiltinEngine(loud).generate(prompts, SamplingParams(**SAMPLE)) for i in s.response_ids)
    out = BuiltinEngine(loud, vocab_size=V).generate(prompts, SamplingParams(**{**SAMPLE, "top_p": 1.0, "top_k": 0}))
    assert all(i < V for s in out for i in s.response_ids)
    for s in out:
        ids = prompts[s.prompt_index]
        logits = policy_logits(loud, ids + s.response_ids)[len(ids) - 1 : -1, :V]
        want = logits.log_softmax(-1).gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-5, rtol=1e-5)
    for bad in (0, model.config.vocab_size + 1):
        with pytest.raises(ValueError, match="vocab_size"):
            BuiltinEngine(loud, vocab_size=bad)


def test_builtin_engine_refuses_to_generate_past_the_models_context(model):
    """The last line of defence behind the entry points' checks: prompt + max_new_tokens beyond
    max_position_embeddings (256 here) is a ValueError naming the prompt, the budget and the limit."""
    C = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"prompt 1 has 200 tokens: with SamplingParams.max_new_tokens=57 .*"
                                         rf"max_position_embeddings={C}"):
        BuiltinEngine(model).generate([[1] * 10, [1] * 200], SamplingParams(max_new_tokens=57))
    out = BuiltinEngine(model).generate([[1] * 200], SamplingParams(max_new_tokens=56))  # exactly full
    assert len(out[0]) <= C


def test_bf16_sampler_logprobs_within_2x_plain_bf16_error_with_a_bf16_cache(model, prompts, monkeypatch):
    """A bf16 model samples with a bf16 KV cache and fp32 logits (never rounded to bf16): its log-probs of the
    sampled tokens are within 2x the error of a plain bf16 model (its logits rounded to bf16), both against the fp32
    model's no-cache log-probs of the same tokens."""
    import copy

    lo = copy.deepcopy(model).to(torch.bfloat16)
    caches = []
    new_cache = lo.new_cache
    monkeypatch.setattr(lo, "new_cache", lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1])
    eng = BuiltinEngine(lo)
    out = eng.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3))
    assert caches and all(k.dtype == torch.bfloat16 for c in caches for k in c.k) and eng._head32 is None
    err = ref = 0.0
    for s in out:
        ids, resp = prompts[s.prompt_index], torch.tensor(s.response_ids)[:, None]
        truth = policy_logits(model, ids + s.response_ids)[len(ids) - 1 : -1].log_softmax(-1).gather(-1, resp)[:, 0]
        plain = policy_logits(lo, ids + s.response_ids)[len(ids) - 1 : -1].log_softmax(-1).gather(-1, resp)[:, 0]
        err = max(err, float((torch.tensor(s.logprobs) - truth).abs().max()))
        ref = max(ref, float((plain - truth).abs().max()))
    assert 0 < err <= 2 * ref, (err, ref)
