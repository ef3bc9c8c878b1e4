"""Start-up in the torchtitan order (models.build_meta -> parallel.apply_fsdp -> parallel.load_sharded): the loaded
model equals models.load_pretrained exactly on 1 and 2 gloo processes (tied and untied heads, sizes the world size
does not divide, a rank with an empty shard, an index of several files), and a rank's peak memory at start-up is
its shard plus about one tensor, where the old order (a full replica, then FSDP2) holds the whole model."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bupo import models, parallel

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_load_worker.py"
ROOT = HERE.parents[1]
MiB = 2**20
# Odd vocab and hidden sizes (2 ranks get unequal rows); intermediate_size=1 leaves rank 1 an empty gate/up shard.
TIED = {"model_type": "qwen3", "vocab_size": 37, "hidden_size": 15, "intermediate_size": 1, "head_dim": 8,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
UNTIED = {"model_type": "llama", "vocab_size": 51, "hidden_size": 21, "intermediate_size": 13, "head_dim": 4,
          "num_hidden_layers": 3, "num_attention_heads": 3, "num_key_value_heads": 3, "attention_bias": True,
          "mlp_bias": True, "tie_word_embeddings": False, "rope_theta": 10000.0}
# ~85M parameters in 24 layers: 340 MB as fp32 (a replica), 170 MB per rank of 2; saved as bf16 like HF checkpoints
BIG = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1536,
       "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 8, "tie_word_embeddings": True,
       "rope_theta": 10000.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, *args: str) -> None:
    # fixed mmap threshold: freed large blocks go back to the OS at once, so resident sizes measure live tensors
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    script = [str(WORKER), *args]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("ckpt")
    models.save_pretrained(models.build_model(TIED, seed=1), d / "tied")
    models.save_pretrained(models.build_model(UNTIED, seed=2), d / "untied", max_shard_bytes=2048)  # several files
    assert len(list((d / "untied").glob("model-*.safetensors"))) > 1
    return [d / "tied", d / "untied"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_sharded_load_equals_load_pretrained(tmp_path, folders, nproc):
    out = tmp_path / "got.safetensors"
    _run(nproc, "equal", str(out), *map(str, folders))
    got = load_file(out)
    for i, d in enumerate(folders):
        want = models.load_pretrained(d)
        sd = want.state_dict()
        assert {k.split("/", 1)[1] for k in got if k.startswith(f"{i}/")} == set(sd) | {"logits"}
        for k, v in sd.items():
            assert torch.equal(got[f"{i}/{k}"], v), (d.name, k)
        ids = torch.arange(12).remainder(want.config.vocab_size).view(2, 6)
        torch.testing.assert_close(got[f"{i}/logits"], want(ids).detach(), msg=d.name)


def test_start_up_peak_memory_is_a_shard_not_a_replica(tmp_path):
    d = tmp_path / "big"
    models.save_pretrained(models.build_model(BIG, dtype=torch.bfloat16), d)
    _run(2, "memory", str(tmp_path / "mem"), str(d))
    for r in range(2):
        m = json.loads((tmp_path / f"mem.rank{r}.json").read_text())
        print({k: v if k in ("rank", "world") else round(v / MiB, 1) for k, v in m.items()})
        bound = m["shard_bytes"] + 2 * m["largest_fp32"] + 32 * MiB  # shard + one tensor read and cast + slack
        assert m["full_bytes"] > 1.5 * bound  # the test can tell a replica from a shard
        assert m["peak_sharded"] <= bound, m
        assert m["held_full"] >= 0.95 * m["full_bytes"], m  # the old order holds a whole replica
        assert m["peak_full"] > bound, m  # and the peak measurement tells it from a shard (file pages may go: worker)


def test_a_checkpoint_that_does_not_match_is_refused_before_loading(tmp_path, folders):
    """The same one-line ValueError as load_pretrained, naming the folder, before any tensor is read."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folders[0] / "config.json").read_text())
    state = {k: v.clone() for k, v in load_file(folders[0] / "model.safetensors").items()}
    state["model.norm.weight"] = torch.ones(3)
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, bad / "model.safetensors")
    info = parallel.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for load in (models.load_pretrained, lambda p: parallel.load_sharded(models.build_meta(p), p, info)):
        with pytest.raises(ValueError, match=rf"checkpoint in {bad} does not match.*missing \(1\).*up_proj.*"
                                             r"mis-shaped \(1\): model.norm.weight"):
            load(bad)


def test_iter_safetensors_streams_an_index_one_tensor_at_a_time(folders):
    d = folders[1]
    names = [name for name, _ in models.iter_safetensors(d)]
    want = models.load_pretrained(d).state_dict()
    assert sorted(names) == sorted(want)
    only = dict(models.iter_safetensors(d, names={"lm_head.weight"}))
    assert list(only) == ["lm_head.weight"] and torch.equal(only["lm_head.weight"], want["lm_head.weight"])
    meta = models.build_meta(d)
    assert meta.config.num_hidden_layers == 3 and all(p.is_meta for p in meta.parameters())
