"""The update step: 2 gloo processes equal 1 on the same rollout batch; phase one leaves the upper layers and the
final norm bit-identical and moves layers 0..k and the head; phase two moves everything; one step raises the
log-probs of positive-advantage responses and lowers those of negative ones in both phases; TIS weights."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bupo.rollout.interface import Rollout
from bupo.update import pack, split_micro_batches

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_update_worker.py"
ROOT = HERE.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, layer: str, nproc: int, *mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), layer, *mode]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", str(WORKER), str(out), layer, *mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(out)


def _initial() -> dict:
    sys.path.insert(0, str(HERE))
    import dist_update_worker as w

    from bupo import models
    torch.manual_seed(0)
    return dict(models.build_model(w.TINY).named_parameters())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("upd")
    return {(layer, n): _run(d / f"{layer}_{n}.safetensors", layer, n) for layer in ("1", "full") for n in (1, 2)}


@pytest.mark.parametrize("layer", ["1", "full"])
def test_two_processes_equal_one(runs, layer):
    one, two = runs[(layer, 1)], runs[(layer, 2)]
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("layer", ["1", "full"])
def test_two_processes_give_the_gradient_of_one(tmp_path, layer):
    """Plain SGD without clipping: the weight change is -lr x the gradient, so this compares gradients 2 processes
    against 1 (torch 2.8's FSDP2 on gloo summed them, which AdamW and the clip hid almost entirely)."""
    one = _run(tmp_path / "s1.safetensors", layer, 1, "sgd")
    two = _run(tmp_path / "s2.safetensors", layer, 2, "sgd")
    init = {n: p.detach() for n, p in _initial().items()}
    assert any(not torch.equal(one[n], init[n]) for n in one)
    for name in one:
        torch.testing.assert_close(two[name] - init[name], one[name] - init[name], rtol=1e-4, atol=1e-7, msg=name)


def test_log_probs_with_uneven_micro_batch_counts_per_rank(tmp_path):
    """Rank 0 needs several micro-batches, rank 1 one: both run as many FSDP forwards (a rank that stopped early
    would leave the other waiting in an all-gather), and rank 0's log-probs equal one process's."""
    one = _run(tmp_path / "u1.safetensors", "full", 1, "uneven")
    two = _run(tmp_path / "u2.safetensors", "full", 2, "uneven")
    torch.testing.assert_close(two["logp"], one["logp"], rtol=1e-5, atol=1e-6)


def test_collective_micro_batches_on_one_process():
    from bupo.update import collective_micro_batches

    seqs = [Rollout([1] * a, [2] * b) for a, b in [(3, 2), (4, 4), (1, 1), (10, 10), (2, 2)]]
    assert collective_micro_batches(seqs, 10) == split_micro_batches(seqs, 10)
    assert collective_micro_batches(seqs, 10, balanced=True) == split_micro_batches(seqs, 10, count=4)


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: float(v) for k, v in f.metadata().items()}


def test_a_fully_filtered_rank_equals_one_process(tmp_path):
    """Zero-variance filtering leaves rank 1 with no active sequence: same metric keys on both ranks (no mismatched
    all-reduce), and the same update and metrics as one process on the same batch."""
    one = _run(tmp_path / "f1.safetensors", "full", 1, "filter")
    two = _run(tmp_path / "f2.safetensors", "full", 2, "filter")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    m1, m2 = _metadata(tmp_path / "f1.safetensors"), _metadata(tmp_path / "f2.safetensors")
    assert m1.keys() == m2.keys() and {"loss", "entropy", "clip_frac", "approx_kl", "grad_norm"} <= m1.keys()
    for key in m1:
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7, nan_ok=True), key


def _tiny_setup(lr: float = 1e-2):
    sys.path.insert(0, str(HERE))
    import dist_update_worker as w

    from bupo import checkpoint, models, parallel

    info = parallel.init_distributed("cpu")
    model = models.build_model(w.TINY, seed=0)
    parallel.apply_fsdp(model, info)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    checkpoint.init_adamw_state(opt)
    return w, info, model, opt


def _update(model, opt, seqs, info, tis_cap=0.0, **kw):
    from bupo.config import AlgoConfig
    from bupo.update import update_policy
    algo = AlgoConfig(micro_batch_tokens=64, clip_low=0.2, clip_high=0.2, dual_clip=10.0, tis_cap=tis_cap)
    args = dict(info=info, layer=None, norm=False, temperature=1.0, mini_batches=1, grad_clip=1.0)
    return update_policy(model, opt, seqs, algo, **{**args, **kw})


def _snapshot(model, opt) -> tuple[dict, dict]:
    from bupo.parallel import full_tensor
    weights = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}
    state = {n: {k: full_tensor(v).clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    return weights, state


@pytest.mark.parametrize("poison", ["nan_old_logp", "inf_advantage", "nan_advantage"])
def test_a_non_finite_step_is_skipped_without_touching_weights_or_adamw(poison):
    """One bad token makes the loss or gradient non-finite: the optimizer step is skipped and counted, and neither
    the weights nor the AdamW moments and step counts change; a clean batch afterwards still trains."""
    from bupo import parallel
    w, info, model, opt = _tiny_setup()
    try:
        seqs = w.batch()
        bad = seqs[3]
        if poison == "nan_old_logp":
            for s in seqs:
                s.old_logp = torch.zeros(len(s.response_ids)) - 2.0
            bad.old_logp[1] = float("nan")
        else:
            bad.advantage = float("inf") if poison == "inf_advantage" else float("nan")
        before = _snapshot(model, opt)
        m = _update(model, opt, seqs, info)
        assert m["nonfinite_skipped"] == 1 and m["updates"] == 0
        after = _snapshot(model, opt)
        for name in before[0]:
            assert torch.equal(before[0][name], after[0][name]), name
            for k in before[1][name]:
                assert torch.equal(before[1][name][k], after[1][name][k]), (name, k)
        assert all(p.grad is None for p in model.parameters())
        m = _update(model, opt, w.batch(), info)
        assert m["nonfinite_skipped"] == 0 and m["updates"] == 1
        assert all(torch.isfinite(p.detach().full_tensor()).all() for p in model.parameters())
    finally:
        parallel.destroy()


def test_a_log_ratio_of_100_nats_gives_finite_weights():
    """The issue's case inside the update: a token whose old log-prob is 100 nats below the new one (clipped, so
    its gradient is 0) next to ordinary tokens: the step is taken and every weight stays finite."""
    from bupo import parallel
    w, info, model, opt = _tiny_setup()
    try:
        seqs = w.batch()
        from bupo.update import compute_logprobs
        olds = compute_logprobs(model, seqs, layer=None, norm=False, temperature=1.0, token_budget=64)
        for s, lp in zip(seqs, olds):
            s.old_logp = lp.clone()
        seqs[0].old_logp[0] -= 100.0
        seqs[0].advantage = 1.0
        m = _update(model, opt, seqs, info)
        assert m["nonfinite_skipped"] == 0 and m["updates"] == 1 and m["grad_norm"] > 0
        assert all(torch.isfinite(p.detach().full_tensor()).all() for p in model.parameters())
    finally:
        parallel.destroy()


def test_phase_one_touches_only_layers_up_to_k(runs):
    init = {n: p.detach() for n, p in _initial().items()}
    after = runs[("1", 1)]
    for name, before in init.items():
        moved = not torch.equal(after[name], before)
        lower = name.startswith("model.embed_tokens") or (name.startswith("model.layers.")
                                                          and int(name.split(".")[2]) <= 1)
        assert moved == lower, f"{name}: moved={moved}, expected {lower}"
    full = runs[("full", 1)]
    assert all(not torch.equal(full[n], init[n]) for n in init), "phase two must move every parameter"


@pytest.mark.parametrize("layer", [1, None], ids=["phase_one_pi_k", "full"])
def test_one_step_raises_positive_and_lowers_negative_responses(layer):
    """The direction of the update, in both phases: after one AdamW step the mean log-prob of every response with
    advantage +1 rises and of every response with advantage -1 falls, under the policy being optimized (pi^k of
    layer 1 with only layers 0..1 and the head trainable, or the full policy)."""
    from bupo import parallel
    from bupo.update import compute_logprobs, is_phase_one_param
    w, info, model, opt = _tiny_setup(lr=1e-3)
    try:
        seqs = w.batch()
        for i, s in enumerate(seqs):
            s.advantage = 1.0 if i % 2 == 0 else -1.0
        kw = dict(layer=layer, norm=False, temperature=1.0, token_budget=64)
        before = [lp.mean() for lp in compute_logprobs(model, seqs, **kw)]
        trainable = None if layer is None else [p for n, p in model.named_parameters() if is_phase_one_param(n, layer)]
        m = _update(model, opt, seqs, info, layer=layer, trainable=trainable, grad_clip=0.0)
        assert m["updates"] == 1
        after = [lp.mean() for lp in compute_logprobs(model, seqs, **kw)]
        moved = [float(a - b) for a, b in zip(after, before)]
        assert all((d > 0) == (s.advantage > 0) and abs(d) > 1e-5 for d, s in zip(moved, seqs)), moved
    finally:
        parallel.destroy()


@pytest.mark.parametrize("cap, weight", [(5.0, math.exp(-1.0)), (0.2, 0.2)])
def test_tis_weights_scale_the_update_and_the_mismatch_is_logged(cap, weight):
    """algo.tis_cap: every token's loss is weighted by min(pi_old / pi_sampler, cap). A sampler 1 nat more confident
    than the trainer on every token gives the weight min(e^-1, cap), so one plain-SGD step moves every parameter by
    that factor times the unweighted step; logp_mismatch is the mean |old - sampler| = 1."""
    from bupo import parallel
    from bupo.update import compute_logprobs

    def step(tis_cap: float) -> tuple[dict, dict]:
        w, info, model, _ = _tiny_setup()
        try:
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            init = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
            seqs = w.batch()
            olds = compute_logprobs(model, seqs, layer=None, norm=False, temperature=1.0, token_budget=64)
            for s, lp in zip(seqs, olds):
                s.old_logp, s.logprobs = lp, lp + 1.0  # the sampler's log-probs
            m = _update(model, opt, seqs, info, grad_clip=0.0, tis_cap=tis_cap)
            return {n: p.detach().full_tensor() - init[n] for n, p in model.named_parameters()}, m
        finally:
            parallel.destroy()

    plain, m0 = step(0.0)
    weighted, m = step(cap)
    assert m0["logp_mismatch"] == pytest.approx(1.0) and m["logp_mismatch"] == pytest.approx(1.0)
    assert any(d.abs().max() > 0 for d in plain.values())
    for name in plain:
        # atol: the change is (after - before) of weights near 1 (the norms), exact only to fp32 rounding of 1
        torch.testing.assert_close(weighted[name], weight * plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_pack_positions_predict_response_tokens():
    seqs = [Rollout([5, 6, 7], [8, 9]), Rollout([1], [2, 3, 4])]
    p = pack(seqs, torch.device("cpu"))
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert p.cu_seqlens.tolist() == [0, 5, 9]
    assert p.resp_pos.tolist() == [2, 3, 5, 6, 7]
    assert p.labels.tolist() == [8, 9, 2, 3, 4]
    assert [p.input_ids[0, i + 1].item() for i in p.resp_pos.tolist()] == p.labels.tolist()


def test_split_micro_batches():
    seqs = [Rollout([1] * a, [2] * b) for a, b in [(3, 2), (4, 4), (1, 1), (10, 10), (2, 2)]]
    greedy = split_micro_batches(seqs, 10)
    assert greedy == [[0], [1, 2], [3], [4]]
    fixed = split_micro_batches(seqs, 10, count=2)
    assert sorted(i for b in fixed for i in b) == list(range(5)) and len(fixed) == 2
    assert split_micro_batches(seqs[:1], 10, count=3).count([]) == 2


def test_policy_logprobs_over_the_real_vocabulary_only():
    """vocab_size restricts the policy to the first rows of the unembedding: log-probs and entropies of the softmax
    over those rows, and no gradient reaches the padded rows."""
    from bupo import models
    from bupo.update import policy_logprobs

    cfg = dict(model_type="qwen3", vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = models.build_model(cfg, seed=0)
    V = 60
    seqs = [Rollout([3, 9, 4], [7, 59, 1]), Rollout([5], [2, 8])]
    packed = pack(seqs, torch.device("cpu"))
    for layer, norm in ((None, False), (0, True)):
        model.zero_grad(set_to_none=True)
        logp, ent = policy_logprobs(model, packed, layer=layer, norm=norm, temperature=0.7, vocab_size=V)
        (logp.sum() + ent.sum()).backward()
        with torch.no_grad():
            h = model.hidden_states(packed.input_ids, layer=layer, cu_seqlens=packed.cu_seqlens, norm=norm)
            z = (h[0, packed.resp_pos] @ model.unembedding[:V].T / 0.7).log_softmax(-1)  # [N, V]
        torch.testing.assert_close(logp, z.gather(1, packed.labels[:, None])[:, 0])
        torch.testing.assert_close(ent, -(z.exp() * z).sum(-1))
        g = model.lm_head.weight.grad
        assert g[V:].abs().max() == 0 and g[:V].abs().max() > 0
    full, _ = policy_logprobs(model, packed, layer=None)
    assert not torch.allclose(full, policy_logprobs(model, packed, layer=None, vocab_size=V)[0])


def test_no_grad_passes_leave_the_fp32_shards_in_place():
    """The root unit stays gathered after a forward (for the head): a no-grad pass (old log-probs, diagnostics)
    must not leave the gathered bf16 weights where model.parameters() finds them, or the next checkpoint, weight
    sync or optimizer would read them."""
    sys.path.insert(0, str(HERE))
    import dist_update_worker as w

    from bupo import models, parallel
    from bupo.update import compute_logprobs

    info = parallel.init_distributed("cpu")
    try:
        model = models.build_model(w.TINY, seed=0)
        parallel.apply_fsdp(model, info, param_dtype=torch.bfloat16)
        compute_logprobs(model, w.batch(), layer=None, norm=False, temperature=1.0, token_budget=64)
        kinds = {(type(p).__name__, p.dtype) for p in model.parameters()}
        assert kinds == {("DTensor", torch.float32)}, kinds
    finally:
        parallel.destroy()
