"""bupo.bench.step --shape: the Qwen3-0.6B preset the GPU check times (built on the meta device: no weights)."""

import pytest

from bupo.bench.step import SHAPES, flops_per_token, main
from bupo.models.hf_io import _build_meta


def test_qwen3_0_6b_preset_is_qwen3_0_6b():
    model = _build_meta(SHAPES["qwen3-0.6b"])
    assert len(model.model.layers) == 28 and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 596_049_920  # Qwen3-0.6B's parameter count (tied)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (16 * 128, 1024) and attn.k_proj.weight.shape == (8 * 128, 1024)
    body, head = flops_per_token(SHAPES["qwen3-0.6b"])
    assert body == 2 * 28 * (1024 * 128 * (2 * 16 + 2 * 8) + 3 * 1024 * 3072) and head == 2 * 1024 * 151936


def test_preset_refuses_model_flags():
    with pytest.raises(ValueError, match="--layers, --vocab: --shape qwen3-0.6b fixes the model"):
        main(["--shape", "qwen3-0.6b", "--layers", "3", "--vocab", "10"])
