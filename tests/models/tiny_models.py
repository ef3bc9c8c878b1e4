"""Tiny random configs and their transformers twins, shared by the model tests (imported by conftest and tests)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
# transformers 5 names the load dtype `dtype`; 4.x (the test extra claims >= 4.51) takes `torch_dtype`, which 5.x
# still reads with a deprecation warning
DTYPE = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so that head frequencies fall in all three llama3 bands (kept, blended, stretched)
    "original_max_position_embeddings": 32,
}

TINY = {
    # head_dim 16 != hidden 48 / heads 4, as in real Qwen3 configs; GQA 4 -> 2
    "qwen3_tied": dict(
        model_type="qwen3", vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=256, tie_word_embeddings=True,
    ),
    "qwen3_untied": dict(
        model_type="qwen3", vocab_size=101, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=3, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "llama3_scaled": dict(
        model_type="llama", vocab_size=103, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=256, rope_scaling=LLAMA3_SCALING, tie_word_embeddings=False,
    ),
    "llama_tied": dict(
        model_type="llama", vocab_size=103, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=256, tie_word_embeddings=True,
    ),
    "qwen2_bias": dict(
        model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=256, tie_word_embeddings=True,
    ),
}


def hf_model(cfg: dict, seed: int = 0):
    """A transformers model of `cfg` with every parameter randomized (norm weights around 1, nonzero biases),
    so that a misplaced norm or bias cannot hide behind an identity init."""
    kw = copy.deepcopy({k: v for k, v in cfg.items() if k != "model_type"})  # transformers edits rope dicts
    hf_cfg = transformers.AutoConfig.for_model(cfg["model_type"], **kw)
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager",
                                                      **{DTYPE: torch.float32})
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return m.eval()
