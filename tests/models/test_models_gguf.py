"""The real SmolLM2-135M-Instruct, converted from the packaged Q4_1 GGUF: weights, tokenizer, chat template."""

import importlib.util
import json
import subprocess
import sys
import time

import pytest
import torch
from tiny_models import DTYPE, transformers

from bupo import models

TEXTS = [
    "Hello world!",
    "  leading spaces, 12345 digits\n\nnew lines\tand a tab",
    "naïve café — 東京 🙂",
    "Solve x^2 + 3x = 10 and put the answer in \\boxed{42}.",
    "<|im_start|>user\nhi<|im_end|>\n",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
RENDERED = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return models.load_pretrained(smollm2_dir).eval()


@pytest.fixture(scope="module")
def hf_tok(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def test_converted_folder(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    expect = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                  intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                  head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    assert {k: cfg[k] for k in expect} == expect
    tcfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tcfg["model_max_length"] == 8192 and "chat_template" in tcfg
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2


def test_smollm2_path_is_reused(smollm2_dir):
    marker = smollm2_dir / models.gguf.MARKER
    before = marker.stat().st_mtime_ns
    t = time.perf_counter()
    assert models.smollm2_path(smollm2_dir.parent) == smollm2_dir
    assert time.perf_counter() - t < 1.0 and marker.stat().st_mtime_ns == before


@torch.no_grad()
def test_matches_transformers_llama_on_the_same_folder(smollm2_dir, smollm2, hf_tok):
    hf = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, **{DTYPE: torch.float32}).eval()
    ids = torch.tensor([hf_tok(RENDERED, add_special_tokens=False).input_ids])
    ref = hf(ids, output_hidden_states=True)
    # fp32 agreement relative to each tensor's scale (the residual grows to ~2.5e4 by layer 14): transformers 4.51.3 on
    # torch 2.8 computes the real model in another order (max |diff| / max |ref| 2e-6 on the logits; measured
    # 2026-12-07), which element-wise default tolerances reject for entries near zero
    for got, want in [(smollm2(ids), ref.logits),
                      *[(smollm2.hidden_states(ids, layer=layer), ref.hidden_states[layer + 1]) for layer in (0, 14)]]:
        assert (got - want).abs().max() <= 4e-6 * want.abs().max(), ((got - want).abs().max(), want.abs().max())


@torch.no_grad()
def test_greedy_chat_answer_is_sensible(smollm2, hf_tok):
    """Wrong q/k un-permutation or RoPE would turn this into noise; the model answers "Paris"."""
    prompt = hf_tok(RENDERED, add_special_tokens=False).input_ids
    P, new = len(prompt), 8
    cache = smollm2.new_cache(1, P + new)
    mask = torch.ones(1, P + new, dtype=torch.bool)
    h = smollm2.decode(torch.tensor([prompt]), torch.arange(P)[None], cache, 0, mask[:, :P])
    out = []
    for t in range(new):
        nxt = int((h[0, -1] @ smollm2.unembedding.T).argmax())
        out.append(nxt)
        h = smollm2.decode(torch.tensor([[nxt]]), torch.tensor([[P + t]]), cache, P + t, mask[:, : P + t + 1])
    text = hf_tok.decode(out, skip_special_tokens=True)
    assert "Paris" in text, text
    full = torch.tensor([prompt + out[:-1]])  # the cached greedy path equals greedy argmax of the full forward
    assert smollm2(full)[0, P - 1 :].argmax(-1).tolist() == out


def test_tokenizer_round_trips_and_matches_transformers(smollm2_dir, hf_tok):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode("<|im_start|>user").ids[0] == 1  # special tokens are atomic
    assert tok.encode("2024").ids == [tok.token_to_id(d) for d in "2024"]  # smollm pre-tokenizer: one digit each
    assert tok.decode(tok.encode(RENDERED).ids, skip_special_tokens=True).startswith("system\nYou are")


def test_chat_template_renders(smollm2_dir, hf_tok):
    import jinja2

    assert hf_tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True) == RENDERED
    template = json.loads((smollm2_dir / "tokenizer_config.json").read_text())["chat_template"]
    own = jinja2.Environment().from_string(template).render(messages=QUESTION, add_generation_prompt=True)
    assert own == RENDERED


_LLAMA_CPP_TOKENIZE = """
import json, sys, llama_cpp
m = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
print(json.dumps([m.tokenize(t.encode(), add_bos=False, special=True) for t in json.loads(sys.argv[2])]))
"""


def test_tokenizer_matches_llama_cpp(smollm2_dir):
    """llama.cpp's own tokenizer on the same GGUF is an independent reference (run apart: it may crash)."""
    if importlib.util.find_spec("llama_cpp") is None:  # located, not imported: it stays out of this process
        pytest.skip("llama_cpp is not installed")
    gguf_path = models.gguf._smollm2_gguf()
    r = subprocess.run([sys.executable, "-c", _LLAMA_CPP_TOKENIZE, str(gguf_path), json.dumps(TEXTS)],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"llama_cpp could not tokenize here (exit {r.returncode})")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert [tok.encode(t).ids for t in TEXTS] == json.loads(r.stdout.strip().splitlines()[-1])


def test_unsupported_gguf_is_rejected(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        models.convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]  # no half-written folder left behind


def test_unpermute_inverts_the_llama_cpp_row_order():
    import numpy as np

    n_head, hd, inp = 3, 8, 5
    w = np.arange(n_head * hd * inp, dtype=np.float32).reshape(n_head * hd, inp)
    # llama.cpp's converter: within each head, rows (half, i) are stored as (i, half)
    permuted = w.reshape(n_head, 2, hd // 2, inp).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(models.gguf._unpermute(permuted, n_head), w)
