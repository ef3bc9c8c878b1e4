"""The update step: 2 gloo processes equal 1 on the same rollout batch; phase one leaves the upper layers and the
final norm bit-identical and moves layers 0..k and the head; phase two moves everything."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bupo.update import Seq, pack, split_micro_batches

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_update_worker.py"
ROOT = HERE.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, layer: str, nproc: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), layer]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", str(WORKER), str(out), layer]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(out)


def _initial() -> dict:
    sys.path.insert(0, str(HERE))
    import dist_update_worker as w
    import models
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


def test_pack_positions_predict_response_tokens():
    seqs = [Seq([5, 6, 7], [8, 9]), Seq([1], [2, 3, 4])]
    p = pack(seqs, torch.device("cpu"))
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert p.cu_seqlens.tolist() == [0, 5, 9]
    assert p.resp_pos.tolist() == [2, 3, 5, 6, 7]
    assert p.labels.tolist() == [8, 9, 2, 3, 4]
    assert [p.input_ids[0, i + 1].item() for i in p.resp_pos.tolist()] == p.labels.tolist()


def test_split_micro_batches():
    seqs = [Seq([1] * a, [2] * b) for a, b in [(3, 2), (4, 4), (1, 1), (10, 10), (2, 2)]]
    greedy = split_micro_batches(seqs, 10)
    assert greedy == [[0], [1, 2], [3], [4]]
    fixed = split_micro_batches(seqs, 10, count=2)
    assert sorted(i for b in fixed for i in b) == list(range(5)) and len(fixed) == 2
    assert split_micro_batches(seqs[:1], 10, count=3).count([]) == 2


def test_policy_logprobs_over_the_real_vocabulary_only():
    """vocab_size restricts the policy to the first rows of the unembedding: log-probs and entropies of the softmax
    over those rows, and no gradient reaches the padded rows."""
    import models
    from bupo.update import policy_logprobs

    cfg = dict(model_type="qwen3", vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = models.build_model(cfg, seed=0)
    V = 60
    seqs = [Seq([3, 9, 4], [7, 59, 1]), Seq([5], [2, 8])]
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
