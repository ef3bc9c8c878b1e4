"""FSDP2 training modes against the plain fp32 path, under 1 and 2 gloo processes and in both phases (pi^k with
layer=1, and the full policy): activation checkpointing changes no loss and no gradient; model.compile matches
eager within float tolerance and makes no new graph for a new packing; bf16 compute stays within the error of a
plain bf16 evaluation and keeps fp32 master weights and AdamW state."""

import ast
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bupo.loss import policy_loss

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_modes_worker.py"
ROOT = HERE.parents[1]
PHASES = ["k1", "full"]
QWEN3 = dict(model_type="qwen3", vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, nproc: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(WORKER), str(out)]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _load(out: Path) -> tuple[dict, dict]:
    with safe_open(str(out), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, {k: ast.literal_eval(v) for k, v in f.metadata().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker alone and under 2 gloo processes, side by side (each is mostly start-up and waiting)."""
    d = tmp_path_factory.mktemp("modes")
    procs = {n: _start(d / f"modes_{n}.safetensors", n) for n in (1, 2)}
    for proc in procs.values():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-6000:]
    return {n: _load(d / f"modes_{n}.safetensors") for n in procs}


def _params(t: dict, mode: str, phase: str) -> dict:
    prefix = f"{mode}.{phase}."
    return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}


def _initial() -> dict:
    sys.path.insert(0, str(HERE))
    import dist_update_worker as w

    from bupo import models
    return {n: p.detach() for n, p in models.build_model(w.TINY).named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("phase", PHASES)
def test_activation_checkpointing_changes_no_loss_and_no_gradient(runs, nproc, phase):
    """Plain SGD without clipping: every weight moved by -lr x its gradient, so equal weights are equal gradients."""
    t, meta = runs[nproc]
    off, on = _params(t, "eager", phase), _params(t, "ac", phase)
    init = _initial()
    assert any(not torch.equal(off[n], init[n]) for n in off), "the step must move weights"
    for name in off:
        torch.testing.assert_close(on[name] - init[name], off[name] - init[name], rtol=1e-6, atol=1e-9, msg=name)
    assert meta[f"ac.{phase}.loss"] == pytest.approx(meta[f"eager.{phase}.loss"], rel=1e-7)
    assert meta[f"ac.{phase}.mlp_calls"] == 2 * meta[f"eager.{phase}.mlp_calls"] > 0  # recomputed in backward


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ac", "compile", "ac_compile"])
def test_two_processes_equal_one_in_every_mode(runs, mode):
    init = _initial()
    for phase in PHASES:
        one, two = _params(runs[1][0], mode, phase), _params(runs[2][0], mode, phase)
        for name in one:
            torch.testing.assert_close(two[name] - init[name], one[name] - init[name], rtol=1e-4, atol=1e-7,
                                       msg=f"{phase} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("mode", ["compile", "ac_compile"])
def test_compile_matches_eager_without_a_graph_per_packing(runs, nproc, mode):
    """aot_eager (dynamo + AOTAutograd, the graphs and guards inductor gets): gradients and losses equal eager within
    fp32 tolerance, and many new packings (micro-batches of new lengths, both phases, with and without grad) after a
    warm-up make no new graph."""
    t, meta = runs[nproc]
    init = _initial()
    for phase in PHASES:
        eager, comp = _params(t, "eager", phase), _params(t, mode, phase)
        for name in eager:
            torch.testing.assert_close(comp[name] - init[name], eager[name] - init[name], rtol=1e-4, atol=1e-7,
                                       msg=f"{phase} {name}")
        assert meta[f"{mode}.{phase}.loss"] == pytest.approx(meta[f"eager.{phase}.loss"], rel=1e-6)
    assert meta[f"{mode}.new_packings"] >= 5
    assert meta[f"{mode}.graphs_after"] == meta[f"{mode}.graphs_warm"]
    assert meta["compile.graphs_warm"] <= 6  # RMSNorm: view / plain input x grad modes; MLP: grad modes


def _token_losses(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    return torch.stack([policy_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], global_tokens=1.0)[0]
                        for i in range(logp.numel())])


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("phase", PHASES)
def test_bf16_compute_within_bf16_error_with_fp32_master_weights(runs, nproc, phase):
    """FSDP2 with param_dtype=bfloat16 against FSDP2 in fp32, on the same batch and initial weights.
    Tolerances are derived from a plain bf16 evaluation (the model cast to bf16, no FSDP) of the same batch:
    log-probs within 2x its largest error; the loss within 2x its error measured token by token (the mean of
    |l_t(bf16) - l_t(fp32)| over the per-token loss terms, which no cancellation between tokens can make small).
    After the AdamW step every parameter and every AdamW moment is fp32."""
    t, meta = runs[nproc]
    g = lambda what: t[f"bf16.{phase}.{what}"]  # noqa: E731
    lp32, lp16, plain32, plain16 = g("logp_fp32"), g("logp_bf16"), g("logp_plain32"), g("logp_plain16")
    torch.testing.assert_close(lp32, plain32, rtol=1e-5, atol=1e-5)  # the fp32 reference is the plain model
    err, ref_err = (lp16 - lp32).abs().max(), (plain16 - plain32).abs().max()
    assert 0 < err <= 2 * ref_err, (float(err), float(ref_err))  # > 0: the step really computed in bf16
    l32, l16 = _token_losses(plain32, g("old"), g("adv")), _token_losses(plain16, g("old"), g("adv"))
    loss_tol = 2 * float((l16 - l32).abs().mean())
    assert loss_tol > 0
    loss32, loss16 = meta[f"bf16.{phase}.loss_fp32"], meta[f"bf16.{phase}.loss_bf16"]
    assert loss32 == pytest.approx(float(l32.mean()), rel=1e-5)
    assert abs(loss16 - loss32) <= loss_tol, (loss16, loss32, loss_tol)
    assert meta[f"bf16.{phase}.updates"] == 1
    assert meta[f"bf16.{phase}.param_dtypes"] == ["torch.float32"]
    assert meta[f"bf16.{phase}.state_dtypes"] == ["torch.float32"]


def _grads(t: dict, phase: str, net: str) -> dict[str, torch.Tensor]:
    prefix = f"bf16.{phase}.grad_{net}."
    return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}


def _dist(a: dict, b: dict) -> float:
    """L2 distance between two gradients given per parameter (the same names)."""
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    return float(torch.stack([(a[n].double() - b[n].double()).norm() for n in a]).norm())


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("phase", PHASES)
def test_bf16_update_gradient_within_bf16_error(runs, nproc, phase):
    """The gradient of one update step (the trainer's update_policy, SGD at lr 1) in bf16 FSDP2 against fp32 FSDP2,
    within 2x the distance between a plain bf16 and a plain fp32 model's gradients of the same loss (L2 over all
    parameters). The fp32 FSDP2 gradient is the plain fp32 one (the same loss), and the bf16 one differs from it."""
    t, _ = runs[nproc]
    g32, g16, p32, p16 = (_grads(t, phase, n) for n in ("fp32", "bf16", "plain32", "plain16"))
    scale = float(torch.stack([g.double().norm() for g in p32.values()]).norm())
    assert _dist(g32, p32) <= 1e-5 * scale, (_dist(g32, p32), scale)  # FSDP2 fp32 = the plain model's gradient
    ref = _dist(p16, p32)
    assert 0 < _dist(g16, g32) <= 2 * ref, (_dist(g16, g32), ref)


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_bf16_two_processes_equal_one_within_bf16_error(runs, phase):
    """2 gloo processes against 1 in bf16: log-probs and the update's gradient within 2x the plain bf16 error (the
    two differ by reduction order and sharding only, far less than bf16's rounding, which the bound is made of)."""
    (t1, _), (t2, _) = runs[1], runs[2]
    g = lambda t, what: t[f"bf16.{phase}.{what}"]  # noqa: E731
    ref_lp = float((g(t1, "logp_plain16") - g(t1, "logp_plain32")).abs().max())
    assert float((g(t2, "logp_bf16") - g(t1, "logp_bf16")).abs().max()) <= 2 * ref_lp
    ref = _dist(_grads(t1, phase, "plain16"), _grads(t1, phase, "plain32"))
    assert _dist(_grads(t2, phase, "bf16"), _grads(t1, phase, "bf16")) <= 2 * ref


def _qwen3_step(model, packed, layer):
    from bupo.update import policy_logprobs
    logp, _ = policy_logprobs(model, packed, layer=layer)
    old = torch.full_like(logp, -4.2)
    adv = torch.linspace(-1.0, 1.0, logp.numel())
    loss, _ = policy_loss(logp, old.detach(), adv, global_tokens=float(logp.numel()))
    loss.backward()
    grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _has_cxx() -> bool:
    from torch._inductor import cpp_builder, exc
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_cxx(), reason="inductor on CPU needs a C++ compiler (g++ or $CXX)")
def test_inductor_compile_matches_eager_and_compiles_once(monkeypatch):
    """The real path (inductor, C++ on CPU) on Qwen3 (qk-norm: 4-D norm inputs) under FSDP2 in one process:
    losses and gradients equal eager within fp32 tolerance in both phases, and new packings make no new graph.
    Cold, this compiles for about 50 s on 2 busy CPU cores (inductor caches it across runs); one compile thread,
    as a pool of compile workers costs more than it saves there."""
    import torch._inductor.config
    from torch._dynamo.utils import counters

    from bupo import models, parallel
    from bupo.rollout.interface import Rollout
    from bupo.update import compute_logprobs, pack

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    info = parallel.init_distributed("cpu")
    try:
        eager = parallel.apply_fsdp(models.build_model(QWEN3), info)
        comp = parallel.apply_fsdp(models.build_model(QWEN3), info, compile=True)
        g = torch.Generator().manual_seed(0)
        graphs = []
        for n_seqs in (2, 3, 1, 4):
            seqs = [Rollout(torch.randint(1, 67, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist(),
                            torch.randint(1, 67, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist())
                    for _ in range(n_seqs)]
            packed = pack(seqs, torch.device("cpu"))
            for layer in (1, None):
                (le, ge), (lc, gc) = _qwen3_step(eager, packed, layer), _qwen3_step(comp, packed, layer)
                torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
                assert ge.keys() == gc.keys()
                for name in ge:
                    torch.testing.assert_close(gc[name], ge[name], rtol=1e-4, atol=1e-6, msg=name)
            compute_logprobs(comp, seqs, layer=None, norm=False, temperature=1.0, token_budget=64)
            graphs.append(counters["stats"]["unique_graphs"])
        assert graphs[1:] == graphs[:1] * 3, graphs
    finally:
        parallel.destroy()


def test_compile_is_refused_without_a_cxx_compiler(monkeypatch):
    from torch._inductor import cpp_builder, exc

    from bupo import models, parallel

    def missing():
        raise exc.InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    with pytest.raises(ValueError, match="model.compile"):
        parallel.compile_modules(models.build_model(QWEN3))
    # the trainer builds on the meta device and shards before loading: the check goes by where the model will run
    info = parallel.init_distributed("cpu")
    try:
        with pytest.raises(ValueError, match="model.compile"):
            parallel.apply_fsdp(models.build_meta(QWEN3), info, compile=True)
    finally:
        parallel.destroy()


def test_compile_covers_norms_and_mlps_and_leaves_liger_fused_modules():
    from bupo import models, parallel

    model = models.build_model(QWEN3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = parallel.compile_modules(model, "eager")
    assert len(done) == 3 * 5 + 1  # per layer: 2 layer norms, q/k norms, MLP; plus the final norm
    assert list(model.state_dict()) == list(models.build_model(QWEN3).state_dict())  # checkpoint keys unchanged
    fused = models.build_model(QWEN3)
    for m in fused.modules():
        if hasattr(m, "fused_norm"):
            m.fused_norm = lambda x, w, eps: x
    with pytest.warns(UserWarning, match="liger"):
        done = parallel.compile_modules(fused, "eager")
    assert len(done) == 3  # only the MLPs


def test_config_refuses_compile_with_liger_on():
    from bupo.config import load_config
    with pytest.raises(ValueError, match="model.compile"):
        load_config(["--model.compile=true", "--model.liger=on"])
    assert load_config(["--model.compile=true", "--model.liger=off"]).model.compile


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_runs_exit_handlers_and_flushes_then_leaves(tmp_path, world_size):
    """A finished torchrun rank leaves by os._exit (no interpreter teardown), after its atexit handlers and with its
    output flushed; a single process returns and ends normally."""
    code = ("import atexit, pathlib, sys\n"
            "from bupo import parallel\n"
            f"atexit.register(lambda: pathlib.Path({str(tmp_path / 'handler')!r}).write_text('ran'))\n"
            "print('unflushed line', end='')\n"
            "sys.stderr.write('err line')\n"
            "parallel.exit_process()\n"
            "print(' after')\n")
    env = {**os.environ, "WORLD_SIZE": world_size, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "err line" and (tmp_path / "handler").read_text() == "ran"
    assert r.stdout == ("unflushed line" if world_size == "2" else "unflushed line after\n")
