"""bupo.kernels.bench: the "products" provider (the bare products of the fused path) and a comma list of dtypes
timed in one run with ratio lines. Tiny shapes: what is checked is what runs and what is reported, not timings."""

import csv
import json
import math

import pytest
import torch

from bupo.kernels import bench

_LLE = bench.chunked


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_bare_products_are_the_fused_paths_products(monkeypatch, dtype, tol):
    """Several [rows, Vc] tiles (V not a multiple of Vc, N not of rows): z = h W^T, dh = z W, dW = z^T h in `dtype`,
    the recomputed z standing in for dz."""
    monkeypatch.setattr(_LLE, "TILE_COLS", 16)
    monkeypatch.setattr(_LLE, "CHUNK_BYTES", 4 * 16 * 2)  # tiles of 2 rows x 16 columns
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(5, 8, generator=g).to(dtype), torch.randn(37, 8, generator=g).to(dtype)  # N, V odd
    assert bench._bare_products(h, w, backward=False) == (None, None)
    dh, dw = bench._bare_products(h, w, backward=True)
    z = h.float() @ w.float().T  # [N, V]
    assert dh.dtype == dw.dtype == dtype
    torch.testing.assert_close(dh.float(), z @ w.float(), rtol=tol, atol=tol * z.abs().max().item())
    torch.testing.assert_close(dw.float(), z.T @ h.float(), rtol=tol, atol=tol * z.abs().max().item())


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_provider_runs(mode, dtype):
    fn, ctx, reason = bench.make_provider("products", torch.device("cpu"), 1.0)
    inputs = bench.make_inputs(6, 8, 37, dtype, torch.device("cpu"), "normal")
    bench.make_step(fn, ctx, inputs, mode)()
    h, w = inputs[0], inputs[1]
    grads = (h.grad, w.grad)
    assert reason is None and (all(g is None for g in grads) if mode == "fwd" else
                               all(g is not None and g.dtype == dtype and g.shape == t.shape
                                   for g, t in zip(grads, (h, w))))


def test_dtype_list_times_every_provider_in_each_dtype_and_prints_ratios(tmp_path, capsys):
    out = bench.main(["--shape", "custom", "--hidden", "8", "--vocab", "37", "--tokens", "6", "--dtype",
                      "float32,bfloat16", "--mode", "both", "--providers", "naive,torch,products", "--repeats", "1",
                      "--device", "cpu", "--csv", str(tmp_path / "b.csv")])
    ok = {(r["provider"], r["mode"], r["dtype"]) for r in out["results"] if r["status"] == "ok"}
    assert ok == {(p, m, d) for p in ("naive", "torch", "products") for m in ("fwd", "fwdbwd")
                  for d in ("float32", "bfloat16")}
    assert out["dtype"] == "float32,bfloat16"
    for mode in ("fwd", "fwdbwd"):
        for key in (f"{mode}:torch/products:float32", f"{mode}:torch/products:bfloat16",
                    f"{mode}:naive/products:bfloat16", f"{mode}:torch:bfloat16/float32",
                    f"{mode}:naive:bfloat16/float32", f"{mode}:products:bfloat16/float32"):
            assert math.isfinite(out["ratios"][key]) and out["ratios"][key] > 0, key
    assert out["goals"] == {"fwdbwd:torch/products:bfloat16": "<= 1.2", "fwdbwd:torch:bfloat16/float32": "< 0.5"}
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1])["ratios"] == pytest.approx(out["ratios"])
    assert any(s.startswith("ratio fwdbwd:torch/products:bfloat16 = ") and "(goal <= 1.2: " in s for s in lines)
    assert any(s.startswith("(products: the bare matrix products") for s in lines)
    with open(tmp_path / "b.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"} and len(rows) == 12


def test_single_dtype_keeps_its_keys(tmp_path):
    out = bench.main(["--shape", "custom", "--hidden", "8", "--vocab", "37", "--tokens", "6", "--dtype", "bfloat16",
                      "--mode", "fwd", "--providers", "torch,products", "--repeats", "1", "--device", "cpu",
                      "--csv", str(tmp_path / "b.csv")])
    assert out["dtype"] == "bfloat16" and {"bench", "shape", "N", "H", "V", "results"} <= set(out)
    assert set(out["ratios"]) == {"fwd:torch/products:bfloat16"} and out["goals"] == {}
