"""bupo.models.liger: the fused-op hooks of our modules.

liger-kernel's kernels launch on CUDA only (they do not run under TRITON_INTERPRET), so on CPU the hooks are driven by
a stand-in `liger_kernel.transformers.functional` that keeps liger's calling conventions: RoPE takes the HF layout
[B, n, T, hd] and rotates q/k in place in their [B, T, n, hd] storage, RMSNorm takes (X, W, eps, offset, casting_mode,
in_place). That checks the routing, the layout handling, autograd safety of the in-place rotation and the on/off
switch. The real kernels are compared with the plain modules by the `gpu` tests at the bottom.
"""

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY

from bupo import models
from bupo.config import load_config
from bupo.models import liger

HAS_LIGER_PKG = liger.liger_available()


def _rotate(x_phys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, n, hd] rotated by the half-split rule, cos/sin [B or 1, T, hd]."""
    x1, x2 = x_phys.chunk(2, dim=-1)
    return x_phys * cos[:, :, None] + torch.cat((-x2, x1), dim=-1) * sin[:, :, None]


class _InPlaceRope(torch.autograd.Function):
    """Like liger: q, k arrive as [B, n, T, hd] views, are rotated in their [B, T, n, hd] storage (in place when that
    storage is contiguous) and leave as [B, n, T, hd] views."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        qp, kp = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        qp.copy_(_rotate(qp, cos, sin))
        kp.copy_(_rotate(kp, cos, sin))
        return qp.transpose(1, 2), kp.transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors  # the rotation is orthogonal: its transpose is the rotation by -angle
        dqp, dkp = _rotate(dq.transpose(1, 2), cos, -sin), _rotate(dk.transpose(1, 2), cos, -sin)
        return dqp.transpose(1, 2), dkp.transpose(1, 2), None, None


@pytest.fixture
def fake_liger(monkeypatch):
    """Install the stand-in package and count the calls that reach it."""
    calls = {"rms_norm": 0, "rope": 0, "swiglu": 0}

    def liger_rms_norm(X, W, eps, offset=0.0, casting_mode="llama", in_place=True):
        assert (offset, casting_mode, in_place) == (0.0, "llama", False), (offset, casting_mode, in_place)
        calls["rms_norm"] += 1
        xf = X.float()
        return W * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(X.dtype)

    def liger_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        B, n, T, hd = q.shape
        assert k.shape[0] == B and k.shape[2] == T and cos.shape[-2:] == (T, hd), (q.shape, k.shape, cos.shape)
        calls["rope"] += 1
        return _InPlaceRope.apply(q, k, cos, sin)

    def liger_swiglu(a, b):
        calls["swiglu"] += 1
        return F.silu(a) * b

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_rms_norm, functional.liger_rope, functional.liger_swiglu = liger_rms_norm, liger_rope, liger_swiglu
    pkg, sub = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    pkg.transformers, sub.functional = sub, functional
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    monkeypatch.setattr(liger, "liger_available", lambda: True)
    return calls


def _model(name: str, dtype=torch.float32, device="cpu") -> torch.nn.Module:
    """A tiny model with every parameter random (norm weights around 1), so a dropped weight or bias shows."""
    model = models.build_model(TINY[name], dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in n else 0.08 * noise)
    return model.to(device=device, dtype=dtype)


def _run(model, ids, cu_seqlens=None, layer=None):
    """Forward + backward of a scalar of the output; returns (output, {name: grad})."""
    model.zero_grad(set_to_none=True)
    h = model.hidden_states(ids, layer, cu_seqlens=cu_seqlens)
    out = h @ model.unembedding.T if layer is None else h
    (out.float().square().mean() + out.float().sum() * 1e-3).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _expected_counts(model) -> dict[str, int]:
    c = model.config
    qk_norms = 2 * c.num_hidden_layers if c.model_type == "qwen3" else 0
    return {"rms_norm": 2 * c.num_hidden_layers + 1 + qk_norms, "rope": c.num_hidden_layers,
            "swiglu": c.num_hidden_layers}


@pytest.mark.parametrize("name", ["qwen3_tied", "qwen2_bias", "llama3_scaled"])
def test_hooks_match_plain_modules_forward_and_backward(name, fake_liger):
    plain = _model(name)
    fused = copy.deepcopy(plain)
    counts = liger.use_liger(fused)
    assert counts == _expected_counts(plain)
    torch.manual_seed(0)
    ids = torch.randint(0, plain.config.vocab_size, (2, 11))
    for layer in (None, 1):
        want, want_g = _run(plain, ids, layer=layer)
        got, got_g = _run(fused, ids, layer=layer)
        torch.testing.assert_close(got, want)
        assert got_g.keys() == want_g.keys()
        for n in want_g:
            torch.testing.assert_close(got_g[n], want_g[n], msg=f"grad of {n}, layer={layer}")
    # packed input: positions restart per sequence, cos/sin are [1, N, hd]
    flat, cu = ids.reshape(1, -1), torch.tensor([0, 4, 15, 22])
    torch.testing.assert_close(_run(fused, flat, cu)[0], _run(plain, flat, cu)[0])
    L = plain.config.num_hidden_layers
    layers_run = L + 2 + L  # full forward, layer=1 (layers 0 and 1 only), packed full forward
    assert fake_liger["rope"] == layers_run  # one call per layer and forward: q and k go together
    assert fake_liger["swiglu"] == layers_run
    per_layer = counts["rms_norm"] // L  # the final norm runs in the two full forwards only
    assert fake_liger["rms_norm"] == per_layer * layers_run + 2


def test_hooks_in_the_kv_cache_decode_path(fake_liger):
    plain = _model("qwen3_untied")
    fused = copy.deepcopy(plain)
    liger.use_liger(fused)
    torch.manual_seed(0)
    B, P = 2, 6
    ids = torch.randint(0, plain.config.vocab_size, (B, P + 1))
    pos = torch.arange(P + 1)[None].expand(B, -1)
    mask = torch.ones(B, P + 1, dtype=torch.bool)
    outs = []
    for m in (plain, fused):
        cache = m.new_cache(B, P + 1)
        m.decode(ids[:, :P], pos[:, :P], cache, 0, mask[:, :P])
        outs.append(m.decode(ids[:, P:], pos[:, P:], cache, P, mask))
    torch.testing.assert_close(outs[1], outs[0])
    assert fake_liger["rope"] == 2 * plain.config.num_hidden_layers


def test_switch_off_restores_plain_modules_and_state_dict_is_untouched(fake_liger):
    plain = _model("llama_tied")
    fused = copy.deepcopy(plain)
    keys = list(plain.state_dict())
    liger.use_liger(fused)
    assert list(fused.state_dict()) == keys
    assert liger.use_liger(fused, False) == _expected_counts(plain)
    assert all(getattr(m, a, None) is None for m in fused.modules()
               for a in ("fused_norm", "fused_rope", "fused_swiglu"))
    before = dict(fake_liger)
    ids = torch.randint(0, plain.config.vocab_size, (1, 9))
    assert torch.equal(fused(ids), plain(ids))  # bit-identical: the plain bodies run again
    assert fake_liger == before


def test_use_liger_refuses_foreign_models_and_changes_nothing(fake_liger):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="fused_norm"):
        liger.use_liger(model)
    half = _model("qwen3_tied").model.layers[0].mlp  # has a swiglu hook, no norm or rope hook
    with pytest.raises(ValueError, match="fused_rope"):
        liger.use_liger(half)
    assert half.fused_swiglu is None


def test_resolve_liger_modes(monkeypatch):
    monkeypatch.setattr(liger, "liger_available", lambda: True)
    assert liger.resolve_liger("auto", "cuda") is True
    assert liger.resolve_liger("on", "cuda:0") is True
    assert liger.resolve_liger("auto", "cpu") is False
    assert liger.resolve_liger("off", "cuda") is False
    with pytest.raises(ValueError, match="model.liger='on' needs a CUDA device"):
        liger.resolve_liger("on", "cpu")
    with pytest.raises(ValueError, match="model.liger='maybe' is invalid"):
        liger.resolve_liger("maybe", "cuda")
    monkeypatch.setattr(liger, "liger_available", lambda: False)
    with pytest.warns(UserWarning, match="liger-kernel is not installed"):
        assert liger.resolve_liger("auto", "cuda") is False
    with pytest.raises(ValueError, match="not installed"):
        liger.resolve_liger("on", "cuda")


def test_config_field_is_validated():
    cfg = load_config(["--model.liger=off"])
    assert cfg.model.liger == "off"
    cfg.validate()
    with pytest.raises(ValueError, match="model.liger='yes' is invalid"):
        load_config(["--model.liger=yes"])


# --- the real kernels (CUDA) ------------------------------------------------------------------------------------

def _max_err(a: dict, b: dict) -> float:
    return max((a[n].float() - b[n].float()).abs().max().item() for n in b)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_LIGER_PKG),
                    reason="needs a CUDA device and liger-kernel (pip install -e '.[gpu]')")
@pytest.mark.parametrize("name", ["qwen3_tied", "qwen2_bias", "llama3_scaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_liger_matches_plain_modules_on_cuda(name, dtype):
    torch.manual_seed(0)
    ref = _model(name, torch.float32, "cuda")  # fp32 plain: the reference for both dtypes
    plain, fused = _model(name, dtype, "cuda"), _model(name, dtype, "cuda")
    liger.use_liger(fused)
    ids = torch.randint(0, ref.config.vocab_size, (3, 37), device="cuda")
    r, r_g = _run(ref, ids)
    p, p_g = _run(plain, ids)
    f, f_g = _run(fused, ids)
    if dtype == torch.float32:
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5)
        for n in p_g:
            torch.testing.assert_close(f_g[n], p_g[n], rtol=1e-4, atol=1e-5, msg=n)
        return
    # bf16: the fused model's error against fp32 stays within 2x the plain bf16 model's error
    err_p, err_f = (p.float() - r).abs().max().item(), (f.float() - r).abs().max().item()
    assert err_f <= 2 * err_p + 1e-6, (err_f, err_p)
    assert _max_err(f_g, r_g) <= 2 * _max_err(p_g, r_g) + 1e-6
