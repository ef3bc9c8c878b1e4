"""Hand-written Llama-family decoder (Llama 3.x, Qwen2/2.5, Qwen3 as flags: bupo/models/decoder.py) with HF-compatible
weights in and out.

    model = models.load_pretrained(path, dtype=torch.bfloat16, device="cuda")
    logits = model(input_ids)                       # [B, T, V]
    h = model.hidden_states(input_ids, layer=k)     # runs decoder layers 0..k only
    models.save_pretrained(model, out_dir)          # a folder transformers and vLLM load

GGUF conversion (`convert_gguf`, `smollm2_path`) imports the `gguf` and `tokenizers` libraries only when called.
`models.liger.use_liger(model)` routes RMSNorm, RoPE and SwiGLU through liger-kernel on CUDA (imported when called).
"""

from .attention import KVCache
from .decoder import CausalLM, DecoderConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from .gguf import convert_gguf, resolve_model_path, smollm2_path
from .hf_io import (
                    SUPPORTED_MODEL_TYPES,
                    build_meta,
                    build_model,
                    check_checkpoint,
                    iter_safetensors,
                    load_pretrained,
                    save_pretrained,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CausalLM",
    "DecoderConfig",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "build_meta",
    "build_model",
    "check_checkpoint",
    "convert_gguf",
    "iter_safetensors",
    "load_pretrained",
    "resolve_model_path",
    "save_pretrained",
    "smollm2_path",
]
