"""Weight sync planning: bucket plans, what a phase-one sync sends, gathering full tensors (plain model, FSDP2 world
of one, FSDP2 over 2 gloo processes)."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bupo import models, parallel
from bupo.rollout.weight_sync import chunk_by_bytes, iter_full_tensors, plan_buckets, sync_names, tensor_bytes

ROOT = Path(__file__).resolve().parents[2]
TINY = {"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": True}
TINY_QWEN3 = {**TINY, "model_type": "qwen3", "head_dim": 8, "tie_word_embeddings": False}


def _entries(model, dtype=None):
    return [(n, p.shape, dtype or p.dtype) for n, p in model.named_parameters()]


def _layer(name: str) -> int | None:
    """Decoder-layer index of an HF parameter name, None for the embedding, final norm and head."""
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


# --- plan_buckets / chunk_by_bytes ----------------------------------------------------------------------------------

def test_plan_buckets_bounded_ordered_each_name_once():
    model = models.build_model(TINY)
    entries = _entries(model)
    sizes = {n: tensor_bytes(s, d) for n, s, d in entries}
    cap = 3 * 32 * 64 * 4  # a few MLP matrices
    plan = plan_buckets(entries, cap)
    flat = [n for b in plan for n in b]
    assert flat == [n for n, _, _ in entries]  # order kept, every name exactly once
    for b in plan:
        assert sum(sizes[n] for n in b) <= cap or len(b) == 1
    assert len(plan) > 1


def test_plan_buckets_oversize_tensor_gets_its_own_bucket():
    f32 = torch.float32
    entries = [("a", (10,), f32), ("big", (1000,), f32), ("b", (10,), f32), ("c", (10,), f32)]
    assert plan_buckets(entries, 100) == [["a"], ["big"], ["b", "c"]]
    assert plan_buckets(entries, 10**9) == [["a", "big", "b", "c"]]
    assert plan_buckets([], 100) == []
    with pytest.raises(ValueError, match="max_bucket_bytes"):
        plan_buckets(entries, 0)


def test_plan_buckets_dtype_counts():
    entries = [("a", (64,), torch.float32), ("b", (64,), torch.float32)]
    assert plan_buckets(entries, 256) == [["a"], ["b"]]  # 256 B each in fp32
    assert plan_buckets([(n, s, torch.bfloat16) for n, s, _ in entries], 256) == [["a", "b"]]


def test_chunk_by_bytes_matches_plan_and_is_lazy():
    model = models.build_model(TINY)
    cap = 2 * 32 * 64 * 4
    pulled = []

    def stream():
        for n, p in model.named_parameters():
            pulled.append(n)
            yield n, p.detach()

    chunks = chunk_by_bytes(stream(), cap)
    first = next(chunks)
    assert len(pulled) == len(first) + 1  # only one tensor past the first bucket was produced
    got = [[n for n, _ in first]] + [[n for n, _ in c] for c in chunks]
    assert got == plan_buckets(_entries(model), cap)


# --- names ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_phase_one_sync_sends_layers_0_to_k_and_embedding(tied):
    model = models.build_model({**TINY, "tie_word_embeddings": tied})
    k = 1
    names = sync_names(model, k)
    assert {_layer(n) for n in names} == {0, 1, None}
    assert "model.embed_tokens.weight" in names
    assert ("lm_head.weight" in names) is (not tied)  # tied: the head is the embedding, sent once
    assert "model.norm.weight" not in names  # the final norm does not change in phase one
    per_layer = sum(1 for n, _ in model.named_parameters() if _layer(n) == 0)
    assert len(names) == 2 * per_layer + (1 if tied else 2)
    assert sync_names(model, None) == [n for n, _ in model.named_parameters()]


# --- iter_full_tensors --------------------------------------------------------------------------------------------

def test_iter_full_tensors_plain_model():
    model = models.build_model({**TINY, "tie_word_embeddings": False})
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = sync_names(model, 1)
    cap = 3 * 32 * 64 * 4
    buckets = list(iter_full_tensors(model, names, cap))
    assert [n for b, _ in buckets for n, _ in b] == names
    for bucket, nbytes in buckets:
        assert nbytes == sum(t.numel() * t.element_size() for _, t in bucket)
        assert nbytes <= cap or len(bucket) == 1
        for n, t in bucket:
            assert torch.equal(t, ref[n]) and not t.requires_grad
    half = list(iter_full_tensors(model, names, cap, dtype=torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for b, _ in half for _, t in b)
    assert sum(b for _, b in half) * 2 == sum(b for _, b in buckets)
    with pytest.raises(ValueError, match="no parameters named"):
        next(iter_full_tensors(model, ["model.layers.9.mlp.up_proj.weight"], cap))


def test_iter_full_tensors_fsdp_world_of_one():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this pytest process")
    model = models.build_model(TINY)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = parallel.init_distributed("cpu")
    try:
        parallel.apply_fsdp(model, info)
        assert any(hasattr(p, "full_tensor") for p in model.parameters())  # really DTensors
        names = sync_names(model, None)
        got = {n: t for b, _ in iter_full_tensors(model, names, 4096) for n, t in b}
        assert list(got) == names
        for n, t in got.items():
            assert not hasattr(t, "full_tensor")
            torch.testing.assert_close(t, ref[n], rtol=0, atol=0)
        # the trainer's sync into the built-in engine: phase one overwrites layers 0..1 + embedding only
        from bupo.rollout.builtin import BuiltinEngine
        from bupo.rollout.weight_sync import sync_weights

        target = models.build_model(TINY, seed=1)
        before = {n: p.detach().clone() for n, p in target.named_parameters()}
        sent = sync_weights(model, BuiltinEngine(target), 1)
        names = set(sync_names(model, 1))
        assert sent == sum(ref[n].numel() * 4 for n in names)
        for n, p in target.named_parameters():
            torch.testing.assert_close(p.detach(), ref[n] if n in names else before[n], rtol=0, atol=0)
    finally:
        parallel.destroy()


_TWO_RANKS = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from bupo import models
    from bupo import parallel
    from bupo.rollout.weight_sync import iter_full_tensors, sync_names
    sys.path.insert(0, sys.argv[2])
    from test_weight_sync import TINY_QWEN3
    model = models.build_model(TINY_QWEN3)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = parallel.init_distributed("cpu")
    parallel.apply_fsdp(model, info)
    shard = model.model.layers[0].mlp.up_proj.weight
    assert shard.to_local().shape[0] < shard.shape[0]  # sharded over the 2 ranks
    sent = 0
    for bucket, nbytes in iter_full_tensors(model, sync_names(model, 1), 8192, dtype=torch.bfloat16):
        sent += nbytes
        for n, t in bucket:
            torch.testing.assert_close(t, ref[n].to(torch.bfloat16), rtol=0, atol=0)
    if info.rank == 0:
        open(sys.argv[1], "w").write(str(sent))
    parallel.destroy(wait=True)
    parallel.exit_process()  # as every finished torchrun worker: gloo's threads can abort the interpreter's teardown
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_iter_full_tensors_fsdp_two_processes(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    out = tmp_path / "sent.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(script), str(out), str(Path(__file__).parent)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = models.build_model(TINY_QWEN3)
    expected = sum(p.numel() * 2 for n, p in model.named_parameters() if n in set(sync_names(model, 1)))
    assert int(out.read_text()) == expected


def test_module_owners_map_hf_names_to_fused_engine_modules():
    from bupo.rollout.weight_sync import module_owners

    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.qkv_proj.weight",
             "model.layers.0.self_attn.qkv_proj.bias", "model.layers.0.mlp.gate_up_proj.weight", "lm_head.weight"]
    owner, members = module_owners(names, {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                           "gate_up_proj": ["gate_proj", "up_proj"]})
    qkv = "model.layers.0.self_attn.qkv_proj"
    assert members[qkv] == {f"model.layers.0.self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")}
    assert owner["model.layers.0.mlp.up_proj.weight"] == "model.layers.0.mlp.gate_up_proj"
    assert members["lm_head"] == {"lm_head.weight"} and owner["model.embed_tokens.weight"] == "model.embed_tokens"


def test_whole_modules_holds_back_until_complete_and_refuses_a_partial_module():
    from bupo.rollout.weight_sync import module_owners, whole_modules

    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    owner, members = module_owners(["a.qkv_proj.weight", "a.o_proj.weight"], fused)
    t = torch.zeros(1)
    seen = []
    stream = whole_modules(iter([("a.q_proj.weight", t), ("a.o_proj.weight", t), ("a.k_proj.weight", t),
                                 ("a.v_proj.weight", t)]), owner, members)
    for name, _ in stream:
        seen.append(name)
    assert seen == ["a.o_proj.weight", "a.q_proj.weight", "a.k_proj.weight", "a.v_proj.weight"]
    seen.clear()
    with pytest.raises(ValueError, match=r"partial module sync refused: 'a\.v_proj\.weight' is missing"):
        for name, _ in whole_modules(iter([("a.q_proj.weight", t), ("a.k_proj.weight", t), ("a.o_proj.weight", t)]),
                                     owner, members):
            seen.append(name)
    assert seen == ["a.o_proj.weight"]  # q and k were never passed on
    with pytest.raises(ValueError, match="sent twice"):
        list(whole_modules(iter([("a.q_proj.weight", t)] * 2), owner, members))
    with pytest.raises(ValueError, match="no tensor 'a.x.weight'"):
        list(whole_modules(iter([("a.x.weight", t)]), owner, members))
