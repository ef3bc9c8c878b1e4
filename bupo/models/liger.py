"""liger-kernel's fused RMSNorm, RoPE and SwiGLU inside our decoder (bupo/models/decoder.py; CUDA, optional).

The decoder's modules carry one hook, None by default (the plain PyTorch body runs):
  RMSNorm.fused_norm(x, weight, eps) -> y          every RMSNorm (layer norms, q/k norms, the final norm)
  Attention.fused_rope(q, k, cos, sin) -> (q, k)   q [B, T, nh, hd], k [B, T, nkv, hd], cos/sin [B, T, hd]
  MLP.fused_swiglu(gate, up) -> silu(gate) * up
`use_liger(model, True)` points the hooks at liger's Triton functions, `use_liger(model, False)` clears them.
Parameters, their names and the state dict do not change, so loading, saving, FSDP2 and weight sync are unaffected;
apply it before FSDP2 / compile. liger's kernels launch on CUDA only (they do not run under TRITON_INTERPRET), so
`resolve_liger` turns them on only for CUDA runs.

Numerics match the plain modules' order of operations: RMSNorm uses liger's "llama" casting mode (mean square and
rsqrt in fp32, cast to the input dtype, then times the weight), RoPE is the half-split rotation of the HF code.
RMSNorm runs with in_place=False: liger's in-place backward overwrites the incoming gradient, which is only safe when
no other node still reads that tensor; one extra [N, H] buffer in backward buys not having to prove that per call site.

Relies on `liger_kernel.transformers.functional.{liger_rms_norm, liger_rope, liger_swiglu}`, present with these
signatures in liger-kernel 0.5 through 0.8 (the range pinned in the `gpu` extra).
"""

import functools
import importlib.util
import warnings

import torch
import torch.nn as nn

LIGER_MODES = ("auto", "on", "off")


@functools.cache
def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_liger(mode: str, device: torch.device | str) -> bool:
    """Whether to use liger for a model on `device`: "auto" -> on CUDA when liger-kernel is installed (warns when it
    is not), "on" -> required (ValueError off CUDA or when not installed), "off" -> never."""
    if mode not in LIGER_MODES:
        raise ValueError(f"model.liger={mode!r} is invalid; valid values: {', '.join(LIGER_MODES)}")
    cuda = torch.device(device).type == "cuda"
    if mode == "off":
        return False
    if mode == "on":
        if not cuda:
            raise ValueError(f"model.liger='on' needs a CUDA device (liger's kernels run on GPUs only), got {device}")
        if not liger_available():
            raise ValueError("model.liger='on' but liger-kernel is not installed (pip install -e '.[gpu]'), "
                             "or set model.liger=off")
        return True
    if cuda and not liger_available():
        warnings.warn("liger-kernel is not installed: RMSNorm, RoPE and SwiGLU run as plain PyTorch "
                      "(pip install -e '.[gpu]' for the fused kernels; model.liger=off silences this)", stacklevel=2)
    return cuda and liger_available()


def _functions():
    """The three liger callables adapted to the hook signatures (imported here, never at module import)."""
    from liger_kernel.transformers.functional import liger_rms_norm, liger_rope, liger_swiglu

    def norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return liger_rms_norm(x, w, eps, 0.0, "llama", False)  # offset 0, llama casting, not in place

    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # liger takes the HF layout [B, n, T, hd]; ours is [B, T, n, hd], whose transpose is exactly the storage
        # liger works on, so neither direction copies. liger may rotate q and k in place and returns views.
        q, k = liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2)

    return norm, rope, liger_swiglu


def use_liger(model: nn.Module, enabled: bool = True) -> dict[str, int]:
    """Set (or clear) the fused hooks on every module of `model` that has them; returns how many of each."""
    hooks = {"fused_norm": [], "fused_rope": [], "fused_swiglu": []}
    for m in model.modules():
        for attr, found in hooks.items():
            if hasattr(m, attr):
                found.append(m)
    missing = [attr for attr, found in hooks.items() if not found]
    if enabled and missing:  # checked before anything is set, so a refused model is left as it was
        raise ValueError(f"{type(model).__name__} has no modules with {missing}; "
                         "use_liger supports the models of this package only")
    fns = _functions() if enabled else (None, None, None)
    for (attr, found), fn in zip(hooks.items(), fns):
        for m in found:
            setattr(m, attr, fn)
    return {"rms_norm": len(hooks["fused_norm"]), "rope": len(hooks["fused_rope"]),
            "swiglu": len(hooks["fused_swiglu"])}
