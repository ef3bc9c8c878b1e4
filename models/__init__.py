"""Hand-written Qwen3 / Llama modules with HF-compatible weights in and out.

    model = models.load_pretrained(path, dtype=torch.bfloat16, device="cuda")
    logits = model(input_ids)                       # [B, T, V]
    h = model.hidden_states(input_ids, layer=k)     # runs decoder layers 0..k only
    models.save_pretrained(model, out_dir)          # a folder transformers and vLLM load

GGUF conversion (`convert_gguf`, `smollm2_path`) imports the `gguf` and `tokenizers` libraries only when called.
`models.liger.use_liger(model)` routes RMSNorm, RoPE and SwiGLU through liger-kernel on CUDA (imported when called).
"""

from .attention import KVCache
from .gguf import convert_gguf, resolve_model_path, smollm2_path
from .hf_io import SUPPORTED_MODEL_TYPES, build_model, load_pretrained, save_pretrained
from .llama import LlamaConfig, LlamaForCausalLM
from .qwen3 import Qwen3Config, Qwen3ForCausalLM

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "build_model",
    "convert_gguf",
    "load_pretrained",
    "resolve_model_path",
    "save_pretrained",
    "smollm2_path",
]
