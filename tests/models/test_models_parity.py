"""Our Qwen3 / Llama modules against transformers on tiny random configs (fp32, CPU, default tolerances)."""

import pytest
import torch
from tiny_models import LLAMA3_SCALING, TINY, hf_model
from torch.testing import assert_close

from bupo import models

LENS = [5, 9, 3]


def _ids(vocab: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_and_every_hidden_state_match_transformers(pair):
    ours, hf = pair
    L = ours.config.num_hidden_layers
    ids = _ids(ours.config.vocab_size, 2, 13)
    ref = hf(ids, output_hidden_states=True)
    assert_close(ours(ids), ref.logits)
    for l in range(L - 1):
        assert_close(ours.hidden_states(ids, layer=l), ref.hidden_states[l + 1])
    assert_close(ours.hidden_states(ids, layer=None), ref.hidden_states[L])  # HF's last entry is final-normed
    assert_close(ours.hidden_states(ids, layer=L - 1, norm=True), ref.hidden_states[L])
    assert_close(ours.unembedding, hf.lm_head.weight)


@torch.no_grad()
def test_llama3_rope_scaling_is_a_flag_of_every_family(tmp_path):
    cfg = dict(TINY["qwen3_untied"], rope_scaling=LLAMA3_SCALING)
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = models.load_pretrained(tmp_path)
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    ids = _ids(cfg["vocab_size"], 2, 13)
    assert_close(ours(ids), hf(ids).logits)


def test_tied_head_is_one_parameter(pair):
    ours, _ = pair
    tied = ours.config.tie_word_embeddings
    assert (ours.unembedding is ours.model.embed_tokens.weight) == tied


@torch.no_grad()
def test_packed_matches_separate_sequences_and_padded_batch(pair):
    ours, hf = pair
    V, T = ours.config.vocab_size, max(LENS)
    seqs = [_ids(V, 1, n, seed=i) for i, n in enumerate(LENS)]
    packed = torch.cat(seqs, dim=1)  # [1, N]
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32)
    padded = torch.zeros(len(LENS), T, dtype=torch.long)  # right padding: causal rows never see the pads
    for i, s in enumerate(seqs):
        padded[i, : s.shape[1]] = s[0]
    for layer in (0, 1, None):
        hp = ours.hidden_states(packed, layer, cu_seqlens=cu)
        hb = ours.hidden_states(padded, layer)
        for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            assert_close(hp[:, s:e], hb[i : i + 1, : e - s])
    logits = ours(packed, cu_seqlens=cu)
    for s, e, seq in zip(cu[:-1].tolist(), cu[1:].tolist(), seqs):
        assert_close(logits[:, s:e], hf(seq).logits)
    # explicit position_ids give the same result as the derived ones
    pos = torch.cat([torch.arange(n) for n in LENS])[None]
    assert_close(ours(packed, cu_seqlens=cu, position_ids=pos), logits)


def test_packed_input_is_validated(pair):
    ours, _ = pair
    ids = _ids(ours.config.vocab_size, 2, 6)
    with pytest.raises(ValueError, match="packed"):
        ours(ids, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        ours(ids[:1], cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))


@pytest.mark.parametrize("norm", [False, True])
def test_truncated_forward_runs_and_trains_only_layers_up_to_k(pair, norm):
    ours, _ = pair
    L, k = ours.config.num_hidden_layers, 1
    calls = [0] * L
    for i, layer in enumerate(ours.model.layers):
        orig = layer.forward

        def counted(*a, _i=i, _orig=orig, **kw):
            calls[_i] += 1
            return _orig(*a, **kw)

        layer.forward = counted
    ids = _ids(ours.config.vocab_size, 2, 7)
    ours.hidden_states(ids, layer=k, norm=norm).sum().backward()
    assert calls == [1] * (k + 1) + [0] * (L - k - 1)
    for i in range(L):
        grads = [p.grad for p in ours.model.layers[i].parameters()]
        if i <= k:
            assert all(g is not None for g in grads), f"layer {i} <= k lacks a gradient"
        else:
            assert all(g is None for g in grads), f"layer {i} > k got a gradient"
    assert (ours.model.norm.weight.grad is None) != norm
    assert ours.model.embed_tokens.weight.grad is not None
    if not ours.config.tie_word_embeddings:
        assert ours.lm_head.weight.grad is None


def test_layer_out_of_range_is_a_value_error(pair):
    ours, _ = pair
    ids = _ids(ours.config.vocab_size, 1, 4)
    for bad in (-1, ours.config.num_hidden_layers, 1.0, True):
        with pytest.raises(ValueError, match="layer"):
            ours.hidden_states(ids, layer=bad)
    with pytest.raises(ValueError, match="layer"):
        ours.capture(ids, layers=[0, 99])


def _hf_hooked(hf, ids) -> list[dict]:
    """The modular quantities of every HF decoder layer, recorded with forward hooks on its public submodules."""
    rec = [dict() for _ in hf.model.layers]
    handles = []

    def put(i, key, take):
        def hook(mod, args, kwargs_or_out, out=None):
            rec[i][key] = take(args, kwargs_or_out, out)

        return hook

    for i, layer in enumerate(hf.model.layers):
        handles += [
            layer.register_forward_pre_hook(
                put(i, "layer_in", lambda a, kw, o: a[0] if a else kw["hidden_states"]), with_kwargs=True
            ),
            layer.input_layernorm.register_forward_hook(put(i, "attn_in", lambda a, o, _: o)),
            layer.self_attn.register_forward_hook(put(i, "attn_out", lambda a, o, _: o[0])),
            layer.post_attention_layernorm.register_forward_hook(put(i, "ffn_in", lambda a, o, _: o)),
            layer.mlp.register_forward_hook(put(i, "ffn_out", lambda a, o, _: o)),
            layer.register_forward_hook(
                put(i, "layer_out", lambda a, o, _: o[0] if isinstance(o, tuple) else o)
            ),
        ]
    try:
        hf(ids)
    finally:
        for h in handles:
            h.remove()
    return rec


@torch.no_grad()
def test_capture_matches_hooks_on_transformers(pair):
    ours, hf = pair
    ids = _ids(ours.config.vocab_size, 2, 11)
    ref = _hf_hooked(hf, ids)
    got = ours.capture(ids)
    assert len(got) == ours.config.num_hidden_layers
    keys = {"layer_in", "attn_in", "attn_out", "ffn_in", "ffn_out", "layer_out"}
    for g, r in zip(got, ref):
        assert set(g) == keys == set(r)
        for key in keys:
            assert_close(g[key], r[key], msg=key)
    for l, g in enumerate(got):  # the identities the entropy analysis relies on
        assert_close(g["layer_out"], g["layer_in"] + g["attn_out"] + g["ffn_out"])
        assert_close(g["layer_out"], ours.hidden_states(ids, layer=l))


@torch.no_grad()
def test_capture_subset_keeps_order_and_stops_early(pair):
    ours, _ = pair
    ids = _ids(ours.config.vocab_size, 1, 8)
    full = ours.capture(ids)
    ran = []
    for i, layer in enumerate(ours.model.layers):
        layer.register_forward_hook(lambda m, a, o, _i=i: ran.append(_i))
    sub = ours.capture(ids, layers=[1, 0])
    assert ran == [0, 1]
    for g, l in zip(sub, [1, 0]):
        for key in g:
            assert_close(g[key], full[l][key])
    assert ours.capture(ids, layers=[]) == []


@torch.no_grad()
def test_capture_on_packed_input(pair):
    ours, _ = pair
    V = ours.config.vocab_size
    seqs = [_ids(V, 1, n, seed=i) for i, n in enumerate(LENS)]
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32)
    got = ours.capture(torch.cat(seqs, 1), cu_seqlens=cu, layers=[0])[0]
    s, e = cu[1].item(), cu[2].item()
    assert_close(got["layer_out"][:, s:e], ours.capture(seqs[1], layers=[0])[0]["layer_out"])


def test_capture_keys_keep_only_the_requested_quantities(pair):
    ours, _ = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 7))
    full = ours.capture(ids, layers=[0, 2])
    some = ours.capture(ids, layers=[0, 2], keys=("layer_out", "ffn_in"))
    assert [set(d) for d in some] == [{"layer_out", "ffn_in"}] * 2
    for f, s in zip(full, some):
        assert all(torch.equal(f[key], s[key]) for key in s)
    with pytest.raises(ValueError, match="unknown"):
        ours.capture(ids, keys=("attn_weights",))


def _bf16_errors(ours, hf, ids: torch.Tensor) -> tuple[float, float]:
    """(max |ours bf16 - ours fp32|, max |transformers bf16 - transformers fp32|) of the final-normed hidden states,
    each model cast to bf16 from the same fp32 weights (transformers in bf16 is the plain PyTorch bf16 reference)."""
    import copy

    errs = []
    for net, fwd in ((ours, lambda m: m.hidden_states(ids, layer=None)),
                     (hf, lambda m: m(ids, output_hidden_states=True).hidden_states[-1])):
        lo = copy.deepcopy(net).to(torch.bfloat16)
        errs.append(float((fwd(lo).float() - fwd(net).float()).abs().max()))
    return errs[0], errs[1]


@torch.no_grad()
def test_bf16_forward_within_2x_the_error_of_transformers_in_bf16(pair):
    """The house rule for bf16: our forward in bf16 is within 2x the error (against its own fp32) of a plain
    PyTorch bf16 model, here transformers' twin cast to bf16."""
    ours, hf = pair
    ids = _ids(ours.config.vocab_size, 2, 13)
    err, ref = _bf16_errors(ours, hf, ids)
    assert 0 < err <= 2 * ref, (err, ref)


@torch.no_grad()
def test_bf16_forward_of_real_smollm2_within_2x_transformers(smollm2_dir):
    """The same rule on the real SmolLM2-135M-Instruct (30 layers; real activations, with their large outlier
    dimensions), on 24 tokens of text."""
    import transformers

    ours = models.load_pretrained(smollm2_dir)
    kw = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="eager", **kw)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("The sum of 17 and 25 is 42, and twice that is 84; so 84 minus 17 is 67.", return_tensors="pt")
    err, ref = _bf16_errors(ours, hf, ids["input_ids"])
    assert 0 < err <= 2 * ref, (err, ref)
