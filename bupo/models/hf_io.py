"""HF checkpoint folders in and out: config.json + model.safetensors (or shards + model.safetensors.index.json).

Loading builds the model on the meta device and assigns the checkpoint tensors (no random init, no second copy),
then ties the head and computes the RoPE buffers on the target device. Only safetensors are read (no pickles).
A folder that cannot be loaded (a file missing, not valid JSON, truncated, not matching the config) is a one-line
ValueError naming the file.
"""

import json
import os
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .decoder import CausalLM, DecoderConfig

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")  # one decoder (bupo/models/decoder.py); the type sets its flags
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def config_from_hf(hf_config: dict) -> DecoderConfig:
    """The config dataclass for an HF config.json dict; ValueError for an unsupported model_type."""
    mt = hf_config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return DecoderConfig.from_hf_dict(hf_config)


def _build_meta(hf_config: dict) -> nn.Module:
    cfg = config_from_hf(hf_config)
    with torch.device("meta"):
        return CausalLM(cfg)


def build_meta(source: str | os.PathLike | dict) -> nn.Module:
    """The model of an HF folder (its config.json, checked as load_pretrained checks it) or of a config.json dict, on
    the meta device: no memory, no weights. Shard it, then `to_empty` + load + `init_buffers` (what
    bupo.parallel.load_sharded does), or load it whole with load_pretrained."""
    return _build_meta(source if isinstance(source, dict) else _read_config(Path(source)))


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


def read_json_object(f: Path) -> dict:
    """A JSON file that must hold an object; ValueError naming the file otherwise."""
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not a valid JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_config(path: Path) -> dict:
    """config.json of `path`, checked: a ValueError naming the file when it is missing, unreadable or unsupported."""
    f = path / "config.json"
    if not f.is_file():
        raise ValueError(f"{path} is not an HF model folder: config.json is missing")
    hf_config = read_json_object(f)
    try:
        config_from_hf(hf_config)
    except (ValueError, TypeError) as e:  # an unsupported, missing or wrongly typed field
        raise ValueError(f"{f}: {e}") from None
    return hf_config


def _checkpoint_files(path: Path) -> list[Path]:
    if (path / INDEX).is_file():
        weight_map = read_json_object(path / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{path / INDEX}: no 'weight_map' of tensor name -> file name")
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{path / INDEX} lists {f.name}, which is missing")
        return files
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise ValueError(f"{path} holds neither {SINGLE} nor {INDEX} (only safetensors checkpoints are read)")


def _open(f: Path, device: str = "cpu"):
    try:
        return safe_open(f, framework="pt", device=device)
    except SafetensorError as e:
        raise ValueError(f"{f}: not a readable safetensors file; truncated or corrupt? ({e})") from None


def _names(keys: list[str], limit: int = 10) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_keys(model: nn.Module, shapes: dict[str, tuple], where: str = "checkpoint") -> None:
    """One ValueError (one line) that lists the missing, unexpected and mis-shaped tensors."""
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
        parts = [f"{name} ({len(keys)}): {_names(keys)}" for name, keys in found.items() if keys]
        raise ValueError(f"{where} does not match the model config: " + "; ".join(parts))


def check_checkpoint(model: nn.Module, path: str | os.PathLike) -> set[str]:
    """Check the checkpoint in HF folder `path` against `model` from the file headers alone (no tensor is read): one
    ValueError naming the folder for missing, unexpected or mis-shaped tensors. `model` may be on the meta device or
    sharded (a DTensor's shape is the global one). Returns the names to load: every state-dict key except a tied head,
    which shares the embedding's parameter (a checkpoint may store it; it is then ignored)."""
    path = Path(path)
    shapes = {}
    for f in _checkpoint_files(path):
        with _open(f) as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    _check_keys(model, shapes, where=f"the checkpoint in {path}")
    return set(model.state_dict()) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())


def iter_safetensors(path: str | os.PathLike, names: Collection[str] | None = None,
                     device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the checkpoint in HF folder `path` (one file, or the shards of its index), one tensor at a time
    in file order, each read when its turn comes and in its stored dtype; only `names` when given. Nothing else holds
    a yielded tensor, so a caller that drops it before the next holds at most one full tensor at once.
    One file handle per tensor: safetensors maps the whole file, and every page a read touches stays in the process's
    resident memory until its handle closes (measured: a rank reading one file through one handle grew by the file)."""
    for f in _checkpoint_files(Path(path)):
        with _open(f) as st:
            keys = [k for k in st.keys() if names is None or k in names]
        for k in keys:
            with _open(f, device=str(device)) as st:
                t = st.get_tensor(k)  # on the CPU a view of the mapping, which lives as long as the tensor
            yield k, t


def load_pretrained(path: str | os.PathLike, dtype=torch.float32, device="cpu") -> nn.Module:
    """Load an HF folder (config.json + single or sharded safetensors) as our Qwen3/Llama module."""
    model = build_meta(path)
    expected = check_checkpoint(model, path)
    state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in iter_safetensors(path, expected, device)}
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
