"""HF checkpoint folders in and out: config.json + model.safetensors (or shards + model.safetensors.index.json).

Loading builds the model on the meta device and assigns the checkpoint tensors (no random init, no second copy),
then ties the head and computes the RoPE buffers on the target device. Only safetensors are read (no pickles).
"""

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .llama import LlamaConfig, LlamaForCausalLM
from .qwen3 import Qwen3Config, Qwen3ForCausalLM

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
_CLASSES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "qwen2": (Qwen3Config, Qwen3ForCausalLM),  # Qwen2/2.5: a flag of the Qwen3 file
    "llama": (LlamaConfig, LlamaForCausalLM),
}
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def config_from_hf(hf_config: dict) -> Qwen3Config | LlamaConfig:
    """The config dataclass for an HF config.json dict; ValueError for an unsupported model_type."""
    mt = hf_config.get("model_type")
    if mt not in _CLASSES:
        raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return _CLASSES[mt][0].from_hf_dict(hf_config)


def _build_meta(hf_config: dict) -> nn.Module:
    cfg = config_from_hf(hf_config)
    with torch.device("meta"):
        return _CLASSES[cfg.model_type][1](cfg)


def build_model(hf_config: dict, dtype=torch.float32, device="cpu", *, seed: int = 0) -> nn.Module:
    """A randomly initialized model (normal(0, initializer_range or 0.02) weights, zero biases, unit norms).

    The draw happens on the CPU with a seeded generator, so the same seed gives the same weights on any device.
    """
    model = _build_meta(hf_config).to_empty(device=device)  # to_empty also materializes the RoPE buffers
    std = hf_config.get("initializer_range", 0.02)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied head is visited once, as embed_tokens.weight
            if name.endswith("norm.weight"):
                w = torch.ones(p.shape)
            elif name.endswith(".bias"):
                w = torch.zeros(p.shape)
            else:
                w = torch.randn(p.shape, generator=g) * std
            p.copy_(w)
    return model.to(dtype=dtype)


def _read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise ValueError(f"{path} is not an HF model folder: config.json is missing")
    return json.loads(f.read_text())


def _checkpoint_files(path: Path) -> list[Path]:
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise ValueError(f"{path} holds neither {SINGLE} nor {INDEX} (only safetensors checkpoints are read)")


def _check_keys(model: nn.Module, shapes: dict[str, tuple]) -> None:
    """One ValueError that lists every missing, unexpected and mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")  # a tied checkpoint may omit it; if present it is ignored
    shapes = {k: v for k, v in shapes.items() if not k.endswith("rotary_emb.inv_freq")}  # old HF exports; derived
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - ({"lm_head.weight"} if tied else set()))
    both = sorted(expected.keys() & shapes.keys())
    wrong = [f"{k}: checkpoint {shapes[k]} vs model {expected[k]}" for k in both if tuple(shapes[k]) != expected[k]]
    found = {"missing": missing, "unexpected": unexpected, "mis-shaped": wrong}
    if any(found.values()):
        parts = [f"{name} ({len(keys)}): {', '.join(keys)}" for name, keys in found.items() if keys]
        raise ValueError("checkpoint does not match the model config:\n  " + "\n  ".join(parts))


def load_pretrained(path: str | os.PathLike, dtype=torch.float32, device="cpu") -> nn.Module:
    """Load an HF folder (config.json + single or sharded safetensors) as our Qwen3/Llama module."""
    path = Path(path)
    model = _build_meta(_read_config(path))
    files = _checkpoint_files(path)
    shapes = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    _check_keys(model, shapes)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    state = {}
    for f in files:
        with safe_open(f, framework="pt", device=str(device)) as st:
            for k in st.keys():
                if k in expected:
                    t = st.get_tensor(k)
                    state[k] = t.to(dtype) if t.is_floating_point() else t
    assign_state_dict(model, state, checked=True)
    model.init_buffers(device)
    return model


def assign_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, checked: bool = False) -> None:
    """Make `state` the model's parameters (no copy), after the same key/shape validation as load_pretrained."""
    if not checked:
        _check_keys(model, {k: tuple(v.shape) for k, v in state.items()})
    if model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()


def _to_save(model: nn.Module, state_dict: dict | None) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-disjoint tensors (safetensors refuses shared storage); tied head dropped."""
    sd = model.state_dict() if state_dict is None else state_dict
    out, seen = {}, set()
    for k, t in sd.items():
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        t = t.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor passed by mistake: gather it
        t = t.to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += n
    return shards + [cur] if cur else shards


def save_pretrained(
    model: nn.Module, out_dir: str | os.PathLike, state_dict: dict | None = None, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write an HF folder that transformers and vLLM load: config.json + model.safetensors, or
    model-0000i-of-0000n.safetensors + model.safetensors.index.json when it exceeds max_shard_bytes.
    `state_dict` (e.g. an FSDP-gathered full state dict) replaces model.state_dict()."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = _to_save(model, state_dict)
    for old in [*out.glob("model-*-of-*.safetensors"), out / SINGLE, out / INDEX]:  # never leave a stale index
        old.unlink(missing_ok=True)
    shards = _shards(sd, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) <= 1:
        save_file(shards[0] if shards else {}, out / SINGLE, metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / name, metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    cfg = model.config.to_hf_dict()
    float_dtypes = [t.dtype for t in sd.values() if t.is_floating_point()]
    name = _DTYPE_NAMES.get(float_dtypes[0] if float_dtypes else torch.float32, "float32")
    cfg["torch_dtype"] = cfg["dtype"] = name  # transformers < 5 reads torch_dtype, >= 5 reads dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for f in out.glob("*.safetensors"):  # safetensors writes 0600; give weights the mode any other file gets
        f.chmod(0o666 & ~umask)
