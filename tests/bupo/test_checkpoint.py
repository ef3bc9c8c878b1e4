"""bupo.checkpoint on a tiny FSDP2 model in a world of one: exact RNG round trip, pruning, and resume from the newest
complete and readable checkpoint when a newer one is damaged (never a traceback, never a half-loaded model)."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bupo import checkpoint, models, parallel

CFG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
       "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
       "max_position_embeddings": 64, "tie_word_embeddings": True}


@pytest.fixture
def info():
    info = parallel.init_distributed("cpu")
    yield info
    parallel.destroy()


def _policy(info):
    model = parallel.apply_fsdp(models.build_model(CFG, seed=0), info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    checkpoint.init_adamw_state(opt)
    return model, opt


def _train_step(model, opt):
    loss = model(torch.tensor([[1, 5, 9, 3]])).float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def _snapshot(model, opt) -> dict[str, torch.Tensor]:
    """Full copies of every parameter and AdamW moment (to compare before / after)."""
    out = {n: parallel.full_tensor(p).detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{n}/{key}"] = parallel.full_tensor(opt.state[p][key]).detach().clone()
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def two_checkpoints(info, tmp_path):
    """Checkpoints at steps 1 and 2 of a tiny run; returns (out_dir, snapshot at 1, snapshot at 2)."""
    model, opt = _policy(info)
    snaps = {}
    for step in (1, 2):
        _train_step(model, opt)
        checkpoint.save(tmp_path, step, model, opt, {"loader": {"epoch": step}}, info)
        snaps[step] = _snapshot(model, opt)
    return tmp_path, snaps[1], snaps[2]


# --- RNG ----------------------------------------------------------------------------------------------------------

def _draw3() -> dict:
    return {"numpy": np.random.rand(3).tolist(), "numpy_gauss": np.random.randn(3).tolist(),
            "python": [random.random() for _ in range(3)], "python_gauss": [random.gauss(0, 1) for _ in range(3)],
            "torch": torch.rand(3).tolist(), "torch_normal": torch.randn(3).tolist()}


@pytest.mark.parametrize("before", [0, 1, 5, 700])  # draws before the save: 700 passes numpy's 624-word refill
def test_rng_state_round_trip_is_exact(tmp_path, before):
    np.random.seed(7)
    random.seed(7)
    torch.manual_seed(7)
    np.random.rand(before)
    np.random.randn(1 + 2 * before)  # an odd count: numpy holds a cached Gaussian at the save
    [random.gauss(0, 1) for _ in range(1 + before)]  # python holds gauss_next at the save
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    want = _draw3()
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # no pickle needed
    assert _draw3() == want


def test_numpy_position_is_restored(tmp_path):
    """The issue's example: save, draw 3, restore, draw 3 must give the same numbers."""
    np.random.seed(0)
    np.random.rand(10)
    st = checkpoint.rng_state()
    a = np.random.rand(3)
    checkpoint.set_rng_state(st)
    np.testing.assert_array_equal(np.random.rand(3), a)


# --- save and prune -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep, kept", [(1, [4]), (2, [3, 4]), (3, [2, 3, 4]), (9, [1, 2, 3, 4])])
def test_save_keeps_the_newest(info, tmp_path, keep, kept):
    model, opt = _policy(info)
    (tmp_path / "checkpoints" / "step_000003.tmp").mkdir(parents=True)  # a crash mid-save left this
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, model, opt, {}, info, keep=keep)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f"step_{s:06d}" for s in kept]
    assert checkpoint.latest(tmp_path).name == "step_000004" and checkpoint.problem(checkpoint.latest(tmp_path)) is None
    state = json.loads((tmp_path / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state == {"step": 4, "world_size": 1}


def test_save_never_deletes_what_it_just_wrote(info, tmp_path):
    """keep=1 with a newer folder on disk (an abandoned later run): the step just written stays."""
    model, opt = _policy(info)
    checkpoint.save(tmp_path, 5, model, opt, {}, info, keep=1)
    checkpoint.save(tmp_path, 3, model, opt, {}, info, keep=1)
    assert (tmp_path / "checkpoints" / "step_000003").is_dir()


# --- damage and resume --------------------------------------------------------------------------------------------

def _shard(ckpt):
    return next(ckpt.glob("*.distcp"))


def _cut(f, keep=0.5):
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "truncated shard": (lambda c: _cut(_shard(c)), "truncated"),
    "empty shard": (lambda c: _shard(c).write_bytes(b""), "truncated"),
    "missing shard": (lambda c: _shard(c).unlink(), "is missing"),
    "missing .metadata": (lambda c: (c / ".metadata").unlink(), ".metadata is missing"),
    "truncated .metadata": (lambda c: _cut(c / ".metadata", 0.3), ".metadata is unreadable"),
    "garbage .metadata": (lambda c: (c / ".metadata").write_bytes(b"\x80\x04not a pickle"), ".metadata"),
    "trainer_state.json not JSON": (lambda c: (c / "trainer_state.json").write_text('{"step": 2, "loa'),
                                    "trainer_state.json is unreadable"),
    "trainer_state.json without step": (lambda c: (c / "trainer_state.json").write_text('{"loader": {}}'),
                                        "step=2"),
    "trainer_state.json wrong step": (lambda c: (c / "trainer_state.json").write_text('{"step": 7, "loader": {}}'),
                                      "step=2"),
    "trainer_state.json a list": (lambda c: (c / "trainer_state.json").write_text("[2]"), "step=2"),
    "trainer_state.json missing": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "trainer_state.json without loader": (lambda c: (c / "trainer_state.json").write_text('{"step": 2}'),
                                          "lacks loader"),
    "rng file missing": (lambda c: (c / "rng_rank0.pt").unlink(), "rng_rank0.pt is missing"),
    "rng file truncated": (lambda c: _cut(c / "rng_rank0.pt"), "rng_rank0.pt is unreadable"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_falls_back_past_a_damaged_newest_checkpoint(info, two_checkpoints, kind):
    out, at1, _ = two_checkpoints
    damage, reason = DAMAGE[kind]
    damage(out / "checkpoints" / "step_000002")
    assert reason in checkpoint.problem(out / "checkpoints" / "step_000002", need=("loader",))
    model, opt = _policy(info)
    with pytest.warns(UserWarning, match=r"step_000002.*" + reason.replace(".", r"\.")) as w:
        path, state = checkpoint.resume(out, model, opt, info, need=("loader",))
    assert "step_000002.damaged" in str(w[0].message) and "step_000001" in str(w[0].message)
    assert path.name == "step_000001" and state["step"] == 1 and state["loader"] == {"epoch": 1}
    assert _same(_snapshot(model, opt), at1)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_000001", "step_000002.damaged"]  # set aside, not deleted


def test_a_shard_that_fails_to_load_leaves_the_model_untouched(info, two_checkpoints):
    """Right size, wrong bytes: the cheap check passes, dcp.load fails; nothing is half-applied, then fallback."""
    out, at1, _ = two_checkpoints
    f = _shard(out / "checkpoints" / "step_000002")
    f.write_bytes(b"\x00" * f.stat().st_size)
    assert checkpoint.problem(f.parent) is None
    model, opt = _policy(info)
    _train_step(model, opt)
    before = _snapshot(model, opt)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="step_000002: reading the shards failed"):
        checkpoint.load(f.parent, model, opt, info)
    assert _same(_snapshot(model, opt), before) and torch.equal(torch.get_rng_state(), rng)
    with pytest.warns(UserWarning, match="step_000002"):
        path, _ = checkpoint.resume(out, model, opt, info)
    assert path.name == "step_000001" and _same(_snapshot(model, opt), at1)


def test_every_checkpoint_damaged_is_an_error_naming_each(info, two_checkpoints):
    out, _, _ = two_checkpoints
    (out / "checkpoints" / "step_000002" / ".metadata").unlink()
    _cut(_shard(out / "checkpoints" / "step_000001"))
    model, opt = _policy(info)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError) as e:
        checkpoint.resume(out, model, opt, info)
    msg = str(e.value)
    assert "step_000002: .metadata is missing" in msg and "step_000001" in msg and "truncated" in msg
    assert "trainer.out_dir" in msg
    assert _same(_snapshot(model, opt), before)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]  # untouched


def test_resume_with_nothing_to_resume(info, tmp_path):
    model, opt = _policy(info)
    assert checkpoint.resume(tmp_path, model, opt, info) is None
    (tmp_path / "checkpoints" / "step_000002.tmp").mkdir(parents=True)  # a save cut short is not a checkpoint
    assert checkpoint.resume(tmp_path, model, opt, info) is None and checkpoint.latest(tmp_path) is None


def test_resume_of_an_intact_checkpoint_is_exact(info, two_checkpoints):
    out, _, at2 = two_checkpoints
    model, opt = _policy(info)
    path, state = checkpoint.resume(out, model, opt, info, need=("loader",))
    assert path.name == "step_000002" and state == {"step": 2, "world_size": 1, "loader": {"epoch": 2}}
    assert _same(_snapshot(model, opt), at2)


@pytest.mark.parametrize("keep, ok", [(0, False), (-2, False), (1, True), (5, True)])
def test_keep_checkpoints_is_validated(keep, ok):
    """keep_checkpoints=0 used to delete every checkpoint, the one just written included."""
    from bupo.config import load_config

    if ok:
        assert load_config([f"--trainer.keep_checkpoints={keep}"]).trainer.keep_checkpoints == keep
    else:
        with pytest.raises(ValueError, match=rf"trainer.keep_checkpoints={keep} is invalid; it must be >= 1"):
            load_config([f"--trainer.keep_checkpoints={keep}"])


def test_two_ranks_agree_on_the_checkpoint_to_resume(tmp_path):
    """Under torchrun a damage only one rank's files show (its shard, its RNG file) or only its dcp.load sees (its
    shard zeroed) sends every rank to the same older checkpoint; no damage resumes the newest; none readable is the
    same error on every rank. Each rank gets its own weights shard, AdamW moments and RNG stream back exactly."""
    here = Path(__file__).parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(here.parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(here / "dist_checkpoint_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"result_rank{r}.json").read_text()) for r in (0, 1))
    assert r0["none"] == r1["none"] == {"step": 2, "weights": True, "rng": True}
    for kind in ("rank 1's shard truncated", "rank 1's shard zeroed", "rank 1's RNG missing"):
        assert r0[kind] == r1[kind] == {"step": 1, "weights": True, "rng": True}, kind
    for r in (r0, r1):
        assert "step_000002: .metadata is missing" in r["every checkpoint"]["error"]
        assert "step_000001: .metadata is missing" in r["every checkpoint"]["error"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_resume_restores_weights_and_cuda_rng(tmp_path):
    """On CUDA the fresh state dicts are CUDA DTensors and the CUDA RNG is restored too."""
    info = parallel.init_distributed("cuda")
    try:
        model = parallel.apply_fsdp(models.build_model(CFG, seed=0, device=info.device), info)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        checkpoint.init_adamw_state(opt)
        loss = model(torch.tensor([[1, 5, 9, 3]], device=info.device)).float().pow(2).mean()
        loss.backward()
        opt.step()
        torch.cuda.manual_seed(5)
        checkpoint.save(tmp_path, 1, model, opt, {}, info)
        want, draws = _snapshot(model, opt), torch.rand(3, device=info.device)
        model2 = parallel.apply_fsdp(models.build_model(CFG, seed=1, device=info.device), info)
        opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
        checkpoint.init_adamw_state(opt2)
        path, _ = checkpoint.resume(tmp_path, model2, opt2, info)
        assert path.name == "step_000001" and _same(_snapshot(model2, opt2), want)
        assert torch.equal(torch.rand(3, device=info.device), draws)
    finally:
        parallel.destroy()
