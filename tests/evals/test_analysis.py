"""bupo.analysis against an independent computation: forward hooks on the transformers implementation of the same
tiny random model, naive fp64 entropies of softmax(x W^T) at the response-predicting positions."""

import copy
import math

import pytest
import torch

from bupo import models
from bupo.analysis import STATES, boundary_layer, entropy_flow, layer_diagnostics
from bupo.rollout.interface import Rollout

transformers = pytest.importorskip("transformers")

TINY = {
    "llama": dict(model_type="llama", vocab_size=103, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4,
                  max_position_embeddings=256, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", vocab_size=101, hidden_size=40, intermediate_size=72, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6,
                  max_position_embeddings=256, tie_word_embeddings=False),
}
# (prompt, response) lengths: a one-token prompt, a one-token response, an empty response (contributes nothing)
SHAPES = [(5, 7), (1, 4), (9, 1), (3, 0), (6, 11)]


def hf_model(cfg: dict):
    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    torch.manual_seed(0)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in 5
    m = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(cfg["model_type"], **kw),
                                                      attn_implementation="eager", **{dtype_kw: torch.float32})
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request, tmp_path_factory):
    hf = hf_model(TINY[request.param])
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return models.load_pretrained(d), hf


@pytest.fixture(scope="module")
def samples(pair):
    g = torch.Generator().manual_seed(1)
    V = pair[1].config.vocab_size
    return [(torch.randint(V, (p,), generator=g).tolist(), torch.randint(V, (r,), generator=g).tolist())
            for p, r in SHAPES]


def rollouts(pairs) -> list[Rollout]:
    return [Rollout(list(prompt), list(response)) for prompt, response in pairs]


def hf_states(hf, ids: list[int]) -> list[dict]:
    """Per layer, the six states of one unpacked sequence, recorded by forward hooks on the HF modules."""
    got = [dict() for _ in hf.model.layers]
    hooks = []

    def put(i, key, pick):
        return lambda mod, args, out: got[i].__setitem__(key, pick(out))

    for i, layer in enumerate(hf.model.layers):
        hooks += [
            layer.register_forward_pre_hook(
                lambda mod, args, kw, i=i: got[i].__setitem__("layer_in", args[0] if args else kw["hidden_states"]),
                with_kwargs=True),
            layer.input_layernorm.register_forward_hook(put(i, "attn_in", lambda o: o)),
            layer.self_attn.register_forward_hook(put(i, "attn_out", lambda o: o[0])),
            layer.post_attention_layernorm.register_forward_hook(put(i, "ffn_in", lambda o: o)),
            layer.mlp.register_forward_hook(put(i, "ffn_out", lambda o: o)),
            layer.register_forward_hook(put(i, "layer_out", lambda o: o[0] if isinstance(o, tuple) else o)),
        ]
    try:
        with torch.no_grad():
            hf(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return got


def naive_entropy(x: torch.Tensor, W: torch.Tensor, T: float) -> torch.Tensor:
    logp = torch.log_softmax(x.double() @ W.double().T / T, dim=-1)  # [n, V] fp64
    return -(logp.exp() * logp).sum(-1)


def reference_flow(hf, samples, *, norm=False, T=1.0, V=None) -> dict:
    L = hf.config.num_hidden_layers
    sums = {s: [0.0] * L for s in STATES}
    count = 0
    for prompt, response in samples:
        if not response:
            continue
        states = hf_states(hf, prompt + response[:-1])
        pos = list(range(len(prompt) - 1, len(prompt) + len(response) - 1))
        count += len(pos)
        for l in range(L):
            for s in STATES:
                x = states[l][s][0, pos]
                if norm:
                    with torch.no_grad():
                        x = hf.model.norm(x)
                sums[s][l] += naive_entropy(x, hf.lm_head.weight[:V], T).sum().item()
    return {s: [v / count for v in sums[s]] for s in STATES} | {"num_tokens": count}


@pytest.mark.parametrize("norm,T", [(False, 1.0), (True, 0.7)])
def test_entropy_flow_matches_transformers_hooks(pair, samples, norm, T):
    ours, hf = pair
    ref = reference_flow(hf, samples, norm=norm, T=T)
    for batch_tokens in (8, None):  # several packed micro-batches, and one
        flow = entropy_flow(ours, rollouts(samples), norm=norm, temperature=T, batch_tokens=batch_tokens)
        assert flow["num_tokens"] == ref["num_tokens"] == sum(r for _, r in SHAPES)
        for s in STATES:
            torch.testing.assert_close(torch.tensor(flow[s]), torch.tensor(ref[s]), rtol=1e-5, atol=1e-5)
        for name, (a, b) in (("delta_layer", ("layer_out", "layer_in")), ("delta_attn", ("attn_out", "attn_in")),
                             ("delta_ffn", ("ffn_out", "ffn_in"))):
            torch.testing.assert_close(torch.tensor(flow[name]), torch.tensor(ref[a]) - torch.tensor(ref[b]),
                                       rtol=1e-5, atol=1e-5)


def test_entropy_flow_over_the_tokenizer_vocabulary(pair, samples):
    """vocab_size: the policies are softmaxes over the first vocab_size unembedding rows (a checkpoint that pads its
    embedding), as the trained policy; the default keeps every row."""
    ours, hf = pair
    V = hf.config.vocab_size - 7
    ref = reference_flow(hf, samples, V=V)
    flow = entropy_flow(ours, rollouts(samples), vocab_size=V)
    assert flow["vocab_size"] == V and entropy_flow(ours, rollouts(samples))["vocab_size"] == hf.config.vocab_size
    for s in STATES:
        torch.testing.assert_close(torch.tensor(flow[s]), torch.tensor(ref[s]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="vocab_size"):
        entropy_flow(ours, rollouts(samples), vocab_size=hf.config.vocab_size + 1)


def test_entropy_flow_contract(pair, samples):
    ours, _ = pair
    L = ours.config.num_hidden_layers
    flow = entropy_flow(ours, rollouts(samples))
    for key in STATES + ("delta_layer", "delta_attn", "delta_ffn"):
        assert isinstance(flow[key], list) and len(flow[key]) == L
    assert flow["num_layers"] == L and flow["norm"] is False and "paper layer = l + 1" in flow["indexing"]
    assert flow["num_samples"] == sum(r > 0 for _, r in SHAPES)
    assert flow["layer_in"][1:] == pytest.approx(flow["layer_out"][:-1])
    if flow["boundary_layer"] is not None:
        assert flow["boundary_layer"] == boundary_layer(flow["delta_ffn"])


def test_entropy_flow_bad_input(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="no response tokens"):
        entropy_flow(ours, rollouts([([1, 2], [])]))
    with pytest.raises(ValueError, match=r"samples\[1\].response_ids"):
        entropy_flow(ours, rollouts([([1, 2], [3]), ([1], [10**6])]))
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        entropy_flow(ours, rollouts([([], [3])]))


def test_boundary_layer_rule():
    assert boundary_layer([0.3, -0.1, 0.2, -0.4, -0.5]) == 2  # last positive, not the largest
    assert boundary_layer([-0.1, -0.2, 0.05]) == 2  # the last layer itself
    assert boundary_layer([0.5, 0.0, -1e-9]) == 0  # zero is not > 0
    assert boundary_layer({"delta_ffn": [0.1, 0.2, -0.3]}) == 1
    rising_then_falling = [0.02 * l for l in range(27)] + [-0.5, -1.5, -3.0]  # a paper-like Llama curve, L = 30
    assert boundary_layer(rising_then_falling) == 26
    with pytest.raises(ValueError, match="no layer has a positive"):
        boundary_layer([-0.1, 0.0, -0.3])
    with pytest.raises(ValueError, match="empty"):
        boundary_layer([])
    with pytest.raises(ValueError, match="non-finite"):
        boundary_layer([0.1, math.nan])


def test_layer_diagnostics_matches_hooks(pair, samples):
    ours, hf = pair
    L = ours.config.num_hidden_layers
    ids = samples[0][0] + samples[0][1]
    states = hf_states(hf, ids)
    hs = [s["layer_out"][0].double() for s in states]
    with torch.no_grad():
        hs.append(hf.model.norm(states[-1]["layer_out"][0]).double())
    W = hf.lm_head.weight.double()
    k = 0
    out = layer_diagnostics(ours, torch.tensor([ids]), k, chunk_rows=5)
    assert out["layers"] == list(range(k + 1, L))
    logp = [torch.log_softmax(h @ W.T, -1) for h in hs]
    for j, l in enumerate(list(range(k + 1, L)) + [L]):
        cos = torch.nn.functional.cosine_similarity(hs[k], hs[l], dim=-1).mean().item()
        kl = (logp[k].exp() * (logp[k] - logp[l])).sum(-1).mean().item()
        got_cos = out["cos"][j] if l < L else out["cos_final"]
        got_kl = out["kl"][j] if l < L else out["kl_final"]
        assert got_cos == pytest.approx(cos, rel=1e-4, abs=1e-5)
        assert got_kl == pytest.approx(kl, rel=1e-4, abs=1e-5)


def test_layer_diagnostics_vocab_size_and_empty_mask(pair, samples):
    ours, _ = pair
    ids = torch.tensor([samples[0][0] + samples[0][1]])
    V = ours.config.vocab_size - 5
    full = layer_diagnostics(ours, ids, 0)
    real = layer_diagnostics(ours, ids, 0, vocab_size=V)
    assert real["cos"] == full["cos"] and real["kl_final"] != full["kl_final"]  # only the policies change
    with torch.no_grad():
        caps = ours.capture(ids, keys=("layer_out",))
        E = ours.unembedding[:V].double()
        h0, hf = caps[0]["layer_out"][0].double(), ours.model.norm(caps[-1]["layer_out"][0]).double()
    p0, pf = torch.log_softmax(h0 @ E.T, -1), torch.log_softmax(hf @ E.T, -1)
    assert real["kl_final"] == pytest.approx((p0.exp() * (p0 - pf)).sum(-1).mean().item(), rel=1e-4, abs=1e-5)
    assert real["num_tokens"] == ids.shape[1]
    with pytest.raises(ValueError, match="no positions"):
        layer_diagnostics(ours, ids, 0, mask=torch.zeros(ids.shape, dtype=torch.bool))


def test_entropy_flow_on_a_sharded_model_leaves_it_trainable(pair, samples):
    """bupo.internal_layer='auto' may run the entropy flow on the FSDP2 model: the next training forward and
    backward (which unshard the layers again) must still work, and the flow equals the unsharded one."""
    from bupo import parallel

    ours = pair[0]
    want = entropy_flow(ours, rollouts(samples))
    model = copy.deepcopy(ours)
    info = parallel.init_distributed("cpu")
    try:
        parallel.apply_fsdp(model, info)
        got = entropy_flow(model, rollouts(samples))
        for key in ("layer_out", "ffn_out", "delta_ffn"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
        ids = torch.tensor([samples[0][0] + samples[0][1]])
        model(ids).sum().backward()  # unshards every layer again
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        parallel.destroy()
