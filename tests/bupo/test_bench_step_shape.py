"""bupo.bench.step: the Qwen3-0.6B preset the GPU check times (built on the meta device: no weights), and --dtype
(honoured on the CPU; a comma list times both dtypes with ratios) on a tiny model."""

import math

import pytest

from bupo.bench.step import SHAPES, flops_per_token, layer_shapes, main
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


TINY = ["--layers", "2", "--hidden", "64", "--vocab", "128", "--k", "0", "--seqs", "2", "--prompt-len", "4",
        "--resp-len", "4", "--repeats", "1", "--device", "cpu"]


def test_dtype_list_times_both_dtypes_with_ratios():
    out = main([*TINY, "--dtype", "bfloat16,float32"])
    assert out["dtype"] == "bfloat16,float32" and set(out["by_dtype"]) == {"bfloat16", "float32"}
    assert all(r["phase_one_s"] > 0 and r["full_s"] > 0 for r in out["by_dtype"].values())
    assert set(out["ratios"]) == {"phase_one:bfloat16/float32", "full:bfloat16/float32"}
    assert all(math.isfinite(v) and v > 0 for v in out["ratios"].values())
    assert out["goals"] == {"full:bfloat16/float32": "<= 0.4"}
    layers = out["layer_products"]
    assert layers["bfloat16_s"] > 0 and layers["float32_s"] > 0
    assert layers["ratio"] == pytest.approx(layers["bfloat16_s"] / layers["float32_s"])


def test_layer_products_are_every_linear_map_of_the_decoder_layers():
    cfg = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 100}
    shapes = layer_shapes(cfg)
    assert shapes == {(64, 64): 6, (64, 32): 6, (64, 192): 6, (192, 64): 3}  # q and o are both 64 x 64
    body, _ = flops_per_token(cfg)  # forward FLOPs per token of the decoder layers: the same maps
    assert sum(2 * a * b * n for (a, b), n in shapes.items()) == body


def test_bf16_is_honoured_on_the_cpu_and_single_dtype_keys_stay():
    out = main(TINY)  # the default --dtype bfloat16
    assert out["dtype"] == "bfloat16" and out["device"] == "cpu"
    assert list(out) == ["ratio", "flop_ratio", "phase_one_s", "full_s", "layers", "k", "hidden", "vocab", "device",
                         "torch", "shape", "dtype", "tokens"]


def test_bad_dtype_names_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--dtype", "bfloat16,fp8"])
    assert e.value.code == 2 and "error: --dtype=bfloat16,fp8: give bfloat16 or float32" in capsys.readouterr().err
