"""HF folders in and out: round trips through transformers, shards, dtypes, and the error messages."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import TINY, hf_model, transformers
from torch.testing import assert_close

from bupo import models


def _keys(folder) -> set[str]:
    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            keys |= set(st.keys())
    return keys


@torch.no_grad()
def test_our_save_loads_in_transformers(tiny_name, tmp_path):
    cfg = TINY[tiny_name]
    ours = models.build_model(cfg, seed=3)
    models.save_pretrained(ours, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == cfg["model_type"]
    hf_class = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
    assert written["architectures"] == [hf_class[cfg["model_type"]]]
    assert written["torch_dtype"] == written["dtype"] == "float32"
    assert ("lm_head.weight" in _keys(tmp_path)) != cfg["tie_word_embeddings"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg["vocab_size"], (2, 9))
    assert_close(ours(ids), hf(ids).logits)
    assert_close(models.load_pretrained(tmp_path)(ids), ours(ids))


def test_build_model_is_seeded_and_tied(tiny_name):
    a = models.build_model(TINY[tiny_name], seed=1)
    assert (a.unembedding is a.model.embed_tokens.weight) == TINY[tiny_name]["tie_word_embeddings"]
    e = models.build_model(TINY[tiny_name]).to_empty(device="cpu")  # re-materializing must keep the tie
    assert (e.unembedding is e.model.embed_tokens.weight) == e.config.tie_word_embeddings
    b = models.build_model(TINY[tiny_name], seed=1)
    c = models.build_model(TINY[tiny_name], seed=2)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb)
        assert torch.equal(pa, pc) == name.endswith(("norm.weight", ".bias")), name  # ones, zeros


@torch.no_grad()
def test_sharded_save_and_load(tmp_path):
    cfg = TINY["llama3_scaled"]
    ours = models.build_model(cfg, seed=0)
    models.save_pretrained(ours, tmp_path, max_shard_bytes=40_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours.state_dict())
    ids = torch.randint(0, cfg["vocab_size"], (1, 10))
    assert_close(models.load_pretrained(tmp_path)(ids), ours(ids))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert_close(hf(ids).logits, ours(ids))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # transformers' own shards and index
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    assert_close(models.load_pretrained(tmp_path / "hf")(ids), ours(ids))
    models.save_pretrained(ours, tmp_path)  # back to one file: no stale shards or index left to confuse a loader
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]


@torch.no_grad()
def test_state_dict_argument_replaces_the_weights(tmp_path):
    ours = models.build_model(TINY["qwen3_tied"], seed=0)
    other = models.build_model(TINY["qwen3_tied"], seed=1)
    models.save_pretrained(ours, tmp_path, state_dict=other.state_dict())
    ids = torch.randint(0, 101, (1, 6))
    assert_close(models.load_pretrained(tmp_path)(ids), other(ids))


@torch.no_grad()
def test_low_precision_load_keeps_fp32_rope(tmp_path):
    hf_model(TINY["llama3_scaled"]).save_pretrained(tmp_path)
    m32 = models.load_pretrained(tmp_path)
    m16 = models.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    inv = m16.model.rotary_emb.inv_freq
    assert inv.dtype == torch.float32 and torch.equal(inv, m32.model.rotary_emb.inv_freq)
    m32.to(torch.bfloat16)  # a cast must not round the frequencies either
    assert torch.equal(m32.model.rotary_emb.inv_freq, inv)
    models.save_pretrained(m16, tmp_path / "bf16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"


def test_meta_build_then_to_empty_materializes_rope():
    from bupo.models.decoder import CausalLM, DecoderConfig

    cfg = DecoderConfig.from_hf_dict(TINY["llama3_scaled"])
    ref = CausalLM(cfg).model.rotary_emb.inv_freq
    with torch.device("meta"):
        m = CausalLM(cfg)
    assert m.model.rotary_emb.inv_freq.is_meta
    m.to_empty(device="cpu")
    assert torch.equal(m.model.rotary_emb.inv_freq, ref)


@pytest.mark.parametrize("name", ["qwen3_untied", "llama3_scaled", "qwen2_bias"])
def test_config_round_trip(name):
    cfg = models.build_model(TINY[name]).config
    d = cfg.to_hf_dict()
    assert type(cfg).from_hf_dict(d) == cfg
    hf_cfg = transformers.AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})
    back = type(cfg).from_hf_dict(hf_cfg.to_dict())  # transformers' own dict (rope_parameters format)
    assert dataclasses.replace(back, extra={}) == cfg


def test_tied_checkpoint_with_lm_head_is_accepted(tmp_path):
    ours = models.build_model(TINY["llama_tied"], seed=0)
    models.save_pretrained(ours, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = models.load_pretrained(tmp_path)
    assert loaded.unembedding is loaded.model.embed_tokens.weight


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path):
    ours = models.build_model(TINY["qwen3_untied"], seed=0)
    models.save_pretrained(ours, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"], sd["lm_head.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    sd["model.layers.2.self_attn.q_norm.weight"] = torch.zeros(5)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        models.load_pretrained(tmp_path)
    msg = str(e.value)
    for needle in ("missing (2)", "model.layers.1.mlp.up_proj.weight", "lm_head.weight", "unexpected (1)",
                   "model.layers.0.self_attn.extra.weight", "mis-shaped (1)",
                   "model.layers.2.self_attn.q_norm.weight: checkpoint (5,) vs model (8,)"):
        assert needle in msg, (needle, msg)


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'; supported: qwen3, qwen2, llama"):
        models.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="supported"):
        models.build_model({"model_type": "mistral"})
    assert set(models.SUPPORTED_MODEL_TYPES) == {"qwen3", "qwen2", "llama"}


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        models.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY["llama_tied"]))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors"):
        models.load_pretrained(tmp_path)


def test_unsupported_rope_scaling_is_rejected():
    bad = dict(TINY["llama_tied"], rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="yarn"):
        models.build_model(bad)


def test_omitted_keys_mean_what_each_family_means():
    base = dict(vocab_size=11, hidden_size=64, intermediate_size=16, num_hidden_layers=1, num_attention_heads=8)
    got = {mt: models.DecoderConfig.from_hf_dict(dict(base, model_type=mt)) for mt in ("llama", "qwen2", "qwen3")}
    assert {mt: c.head_dim for mt, c in got.items()} == {"llama": 8, "qwen2": 8, "qwen3": 128}
    assert {mt: c.rope_theta for mt, c in got.items()} == {"llama": 1e4, "qwen2": 1e6, "qwen3": 1e6}
    for c in got.values():
        assert c.rope_scaling is None and c.num_key_value_heads == 8 and not c.tie_word_embeddings


def test_mlp_bias_is_llama_only():
    assert models.build_model(dict(TINY["llama_tied"], mlp_bias=True)).model.layers[0].mlp.up_proj.bias is not None
    with pytest.raises(ValueError, match="mlp_bias"):
        models.build_model(dict(TINY["qwen3_tied"], mlp_bias=True))


def test_import_models_is_cheap():
    code = ("import sys, models; heavy = [m for m in ('gguf', 'tokenizers', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=Path(models.__file__).parent.parent)
    assert r.stdout.strip() == "[]"



def test_saved_weights_get_the_usual_file_mode(tmp_path):
    import os

    from bupo import models
    cfg = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
    umask = os.umask(0o022)
    try:
        models.save_pretrained(models.build_model(cfg), tmp_path)
    finally:
        os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644


INDEX = "model.safetensors.index.json"


def _broken_folder(tmp_path, how: str) -> tuple[Path, str]:
    """A saved tiny model with one thing broken; returns the folder and the file the error must name."""
    models.save_pretrained(models.build_model(TINY["llama_tied"], seed=0), tmp_path)
    weights, config, index = tmp_path / "model.safetensors", tmp_path / "config.json", tmp_path / INDEX
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "header_only":
        weights.write_bytes(weights.read_bytes()[:64])
    elif how == "config_not_json":
        config.write_text('{"model_type": "llama", ')
    elif how == "config_not_object":
        config.write_text("[1, 2]")
    elif how == "config_wrong_type":
        config.write_text(json.dumps({**json.loads(config.read_text()), "num_attention_heads": "four"}))
    elif how == "index_not_json":
        index.write_text("{")
        return tmp_path, str(index)
    elif how == "index_without_map":
        index.write_text(json.dumps({"metadata": {}}))
        return tmp_path, str(index)
    elif how == "index_missing_shard":
        index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
        return tmp_path, "model-00002-of-00002.safetensors"
    return tmp_path, str(weights if how in ("truncated", "empty", "header_only") else config)


@pytest.mark.parametrize("how", ["truncated", "empty", "header_only", "config_not_json", "config_not_object",
                                 "config_wrong_type", "index_not_json", "index_without_map", "index_missing_shard"])
def test_unreadable_folder_is_a_one_line_error_naming_the_file(tmp_path, how):
    folder, name = _broken_folder(tmp_path, how)
    with pytest.raises(ValueError) as e:
        models.load_pretrained(folder)
    assert name in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_key_mismatch_is_one_line_with_capped_lists(tmp_path):
    big = dict(TINY["llama_tied"], num_hidden_layers=6)
    models.save_pretrained(models.build_model(big, seed=0), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(big, num_hidden_layers=1)))
    with pytest.raises(ValueError) as e:
        models.load_pretrained(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "unexpected (" in msg and "more)" in msg, msg


@pytest.mark.parametrize("field,value,match", [
    ("hidden_size", "big", "hidden_size must be a positive integer, got 'big'"),
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
    ("num_hidden_layers", 2.5, "num_hidden_layers must be a positive integer, got 2.5"),
    ("vocab_size", True, "vocab_size must be a positive integer, got True"),
    ("head_dim", -8, "head_dim must be a positive integer, got -8"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps must be a positive number, got '1e-5'"),
    ("rope_theta", 0, "rope_theta must be a positive number, got 0"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false, got 'yes'"),
    ("rope_scaling", "llama3", "rope_scaling / rope_parameters must be an object, got 'llama3'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": "x", "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     "rope_scaling.factor must be a positive number, got 'x'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0},
     "rope_scaling.low_freq_factor must be a positive number, got None"),
])
def test_wrongly_typed_config_field_names_the_file_and_field(tmp_path, field, value, match):
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY["llama_tied"], **{field: value})))
    with pytest.raises(ValueError) as e:
        models.load_pretrained(tmp_path)
    assert str(e.value) == f"{tmp_path / 'config.json'}: {match}"


def test_llama3_rope_without_its_original_length_is_accepted():
    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    assert models.DecoderConfig.from_hf_dict(dict(TINY["llama_tied"], rope_scaling=sc)).rope_scaling == sc
