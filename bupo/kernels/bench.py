"""Microbenchmarks for the fused linear log-prob + entropy: providers side by side.

    python -m bupo.kernels.bench --shape qwen3-4b --tokens 16384 --dtype bfloat16 --mode both          # GPU
    python -m bupo.kernels.bench --shape custom --hidden 512 --vocab 151936 --tokens 2048 --dtype float32 --mode fwdbwd
    bupo bench kernels --shape custom --hidden 512 --vocab 151936 --tokens 2048 --dtype float32,bfloat16 \
        --mode fwdbwd --providers torch,products                                              # CPU: bf16 vs fp32

Providers: naive (plain PyTorch, materializes [N, V] logits), torch (our chunked PyTorch path), torch-compile
(the same under torch.compile), triton (our kernels; CUDA only), liger (Liger's fused linear cross entropy,
log-prob only) and cce (Apple's cut-cross-entropy, log-prob only) when installed. Extra providers to measure
the CPU denormal guard (use with --regime peaked): torch-noflush (guard off) and torch-ftz (guard off, but
torch.set_flush_denormal(True) around the call, which only reaches the calling thread). products: not an
implementation but a timing floor, the bare matrix products the fused path needs in the input dtype (see
_BareProducts); it computes no log-probs.

Dtypes. --dtype takes one dtype or a comma list (float32,bfloat16): every provider in every dtype is timed in the
same interleaved repeat loop, and after the table come ratio lines of median times: per dtype each provider over
products, and each provider's time in a dtype over its time in float32. Where the issue set a goal for the CPU
(fwd+bwd: bf16 torch <= 1.2x bf16 products, bf16 torch < 0.5x fp32 torch) it is printed next to the ratio.

Method. "fwd" runs under torch.no_grad (old log-probs, entropy analysis); "fwdbwd" backpropagates
sum(g_lp * logp + g_ent * entropy) with random g. Repeats are interleaved across providers and dtypes (fair on a
shared machine); times are median and p20/p80 wall-clock. TFLOP/s-equivalent counts 2NHV (fwd) or 8NHV (fwdbwd) for
every provider. Activation memory is the peak of tensor bytes allocated during one step above what was
allocated before it, not counting the dh/dW outputs: on CPU from the profiler's allocation events (running
total and address of each), on CUDA from torch.cuda.max_memory_allocated; see peak_allocated_bytes.
Each row is appended to --csv with its dtype, device, versions and commit; the last stdout line is one JSON object
(with "ratios" and, where the issue set them, "goals").
"""
import argparse
import contextlib
import csv
import datetime
import functools
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from bupo.kernels import chunked
from bupo.kernels.linear_logprob_entropy import linear_logprob_entropy, triton

SHAPES = {"qwen3-4b": (2560, 151936), "qwen3-8b": (4096, 151936), "llama3-8b": (4096, 128256)}
PROVIDERS = ("naive", "torch", "torch-compile", "torch-noflush", "torch-ftz", "triton", "liger", "cce", "products")
DEFAULT_PROVIDERS = "naive,torch,torch-compile,triton,liger,cce"
LOGIT_STD = {"normal": 2.0, "peaked": 40.0, "flat": 0.01}
DTYPES = ("float32", "bfloat16", "float16")
GOALS = {"fwdbwd:torch/products:bfloat16": ("<=", 1.2), "fwdbwd:torch:bfloat16/float32": ("<", 0.5)}  # issue 20


def peak_allocated_bytes(fn, device: str | torch.device = "cpu", outputs=lambda: ()) -> int:
    """Peak tensor bytes allocated while fn() runs, above the amount allocated when it started, not counting
    the tensors `outputs()` returns afterwards (e.g. the gradients).

    CPU: from the profiler's allocation events (each carries the CPU allocator's running total and the
    address); an output is its address's last allocation. CUDA: max_memory_allocated minus the outputs' bytes
    (exact when the peak is reached with the outputs alive, as in a backward that ends with dW).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base - sum(t.untyped_storage().nbytes() for t in outputs())
    from torch._C._profiler import _EventType
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            x = ev.extra_fields
            events.append((ev.start_time_ns, x.alloc_size, x.total_allocated, x.ptr))
    if not events:
        return 0
    events.sort()
    last = {ptr: i for i, (_, size, _, ptr) in enumerate(events) if size > 0}
    kept = {last[t.data_ptr()] for t in outputs() if t.data_ptr() in last}
    base, out_bytes, peak = events[0][2] - events[0][1], 0, 0  # base: running total before the first event
    for i, (_, size, total, _) in enumerate(events):
        out_bytes += size if i in kept else 0
        peak = max(peak, total - base - out_bytes)
    return peak


# --- providers --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_flush(ftz: bool):
    """Turns the torch path's denormal guard off; with ftz, sets FTZ/DAZ on this thread for the call."""
    old_guard, chunked.FLUSH_BELOW = chunked.FLUSH_BELOW, math.inf
    was_ftz = (torch.tensor([1e-20]) * 1e-20).item() == 0.0  # the only way to read the per-thread flag
    if ftz:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        chunked.FLUSH_BELOW = old_guard
        torch.set_flush_denormal(was_ftz)


def _ours(backend: str, temperature: float):
    return functools.partial(linear_logprob_entropy, temperature=temperature, backend=backend)


def _liger(temperature: float):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda h, w, y: (-loss(w, h / temperature, y), None)


def _cce(temperature: float):
    from cut_cross_entropy import linear_cross_entropy
    return lambda h, w, y: (-linear_cross_entropy(h / temperature, w, y, reduction="none"), None)


def _bare_products(h: torch.Tensor, w: torch.Tensor, backward: bool):
    """The products of one pass of the chunked torch path, nothing else, in h's dtype (bare torch.mm, output in
    that dtype: bf16 in, bf16 out). Forward: z = h W^T. Backward: the recompute z, then dh += dz W and dW = dz^T h
    with the recomputed tile standing in for dz. -> (dh [N, H], dW [V, H]) or (None, None)."""
    N, V = h.shape[0], w.shape[0]
    rows, cols = chunked.tiles(N, V, chunked.CHUNK_BYTES)
    buf = torch.empty(rows * cols, dtype=h.dtype, device=h.device)  # one reused tile, as the torch path's
    dh = torch.zeros_like(h) if backward else None
    dw = torch.empty_like(w) if backward else None
    for v0 in range(0, V, cols):
        wc = w[v0: v0 + cols]  # [Vc, H]
        for r0 in range(0, N, rows):
            hr = h[r0: r0 + rows]  # [rows, H]
            t = torch.mm(hr, wc.T, out=chunked.tile(buf, hr.shape[0], wc.shape[0]))  # [rows, Vc] z (dz in backward)
            if backward:
                dh[r0: r0 + rows].addmm_(t, wc)
                dwc = dw[v0: v0 + wc.shape[0]]
                if r0 == 0:
                    torch.mm(t.T, hr, out=dwc)
                else:
                    dwc.addmm_(t.T, hr)
    return dh, dw


class _BareProducts(torch.autograd.Function):
    """The "products" provider: a timing floor, not an implementation. Only the matrix products the fused path
    does, with its shapes: forward z = h W^T ([N, H] x [H, V], 2NHV); backward the recompute, dh = dz W
    ([N, V] x [V, H]) and dW = dz^T h ([V, N] x [N, H]): 4 products, 8NHV, the count every provider is rated by.
    In the input dtype: bf16 products are plain bf16 torch.mm (bf16 in and out, the hardware's bare bf16 speed),
    fp32 ones fp32 (fp16 ones too run as plain torch.mm, which has no fast CPU kernel: there it is no floor, the
    torch path converts fp16 to fp32 and is faster). Tiling: the torch path's own [rows, Vc] tiles (chunked.tiles, V
    chunks outer), not one [N, V] product, because that is the fairest floor: the same GEMM shapes, and no [N, V]
    result written to memory and read back (traffic the fused path never has, which would make the floor slower
    than the products it bounds).
    It returns zeros for log-probs (so the bench's loss and backward run unchanged) and no entropy."""

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, w)
        _bare_products(h, w, backward=False)
        return h.new_zeros(h.shape[0])  # [N] no log-probs

    @staticmethod
    def backward(ctx, g):
        return _bare_products(*ctx.saved_tensors, backward=True)


def make_provider(name: str, device: torch.device, temperature: float):
    """-> (fn(h, w, y) -> (logp, entropy or None), context for the whole step, None) or (None, None, reason)."""
    cuda_only = {"triton": "triton", "liger": "liger_kernel", "cce": "cut_cross_entropy"}
    if name in cuda_only:
        if importlib.util.find_spec(cuda_only[name]) is None:
            return None, None, f"{cuda_only[name]} is not installed"
        if device.type != "cuda":
            return None, None, f"{name} runs on CUDA only (device is {device})"
    makers = {
        "naive": lambda: _ours("naive", temperature),
        "torch": lambda: _ours("torch", temperature),
        "torch-compile": lambda: torch.compile(_ours("torch", temperature)),
        "torch-noflush": lambda: _ours("torch", temperature),
        "torch-ftz": lambda: _ours("torch", temperature),
        "triton": lambda: _ours("triton", temperature),
        "liger": lambda: _liger(temperature),
        "cce": lambda: _cce(temperature),
        "products": lambda: lambda h, w, y: (_BareProducts.apply(h, w), None),
    }
    ctx = {"torch-noflush": lambda: _no_flush(False), "torch-ftz": lambda: _no_flush(True)}
    return makers[name](), ctx.get(name, contextlib.nullcontext), None


# --- measurement ------------------------------------------------------------------------------------------
def make_inputs(N: int, H: int, V: int, dtype: torch.dtype, device: torch.device, regime: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=g) * 0.02
    h = torch.randn(N, H, generator=g) * (LOGIT_STD[regime] / (0.02 * math.sqrt(H)))
    y = torch.randint(0, V, (N,), generator=g)
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    h, w = (t.to(device, dtype).requires_grad_() for t in (h, w))
    return h, w, y.to(device), g_lp.to(device), g_ent.to(device)


def make_step(fn, ctx, inputs, mode: str):
    h, w, y, g_lp, g_ent = inputs

    def step():
        with ctx(), torch.set_grad_enabled(mode == "fwdbwd"):
            h.grad = w.grad = None
            logp, ent = fn(h, w, y)
            if mode == "fwdbwd":
                loss = (logp * g_lp).sum() + ((ent * g_ent).sum() if ent is not None else 0.0)
                loss.backward()
    return step


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def activation_bytes(step, inputs, device: torch.device) -> int:
    h, w = inputs[0], inputs[1]
    peak = peak_allocated_bytes(step, device, outputs=lambda: [g for g in (h.grad, w.grad) if g is not None])
    h.grad = w.grad = None
    return peak


def run_mode(mode, providers, inputs, device, repeats) -> dict[tuple[str, str], dict]:
    """inputs: {dtype name: make_inputs(...)}. -> {(provider, dtype name): result}."""
    steps, res = {}, {}
    for dt, inp in inputs.items():
        for name, (fn, ctx) in providers.items():
            key = name, dt
            try:  # warm-up (and compile); an optional provider that fails here is reported as skipped
                steps[key] = make_step(fn, ctx, inp, mode)
                timed(steps[key], device)
            except Exception as e:  # noqa: BLE001 (third-party/compile failures must not end the benchmark)
                res[key] = {"status": f"skip: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                steps.pop(key, None)
    times = {key: [] for key in steps}
    for _ in range(repeats):  # interleaved over providers and dtypes, so a busy neighbour slows all alike
        for key, step in steps.items():
            times[key].append(timed(step, device))
    for key, step in steps.items():
        ts = sorted(times[key])
        q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else [ts[0]] * 4
        res[key] = {"status": "ok", "median_ms": 1e3 * statistics.median(ts), "p20_ms": 1e3 * q[0],
                    "p80_ms": 1e3 * q[3], "act_mb": activation_bytes(step, inputs[key[1]], device) / 2**20}
    return res


def ratios(rows: list[dict]) -> dict[str, float]:
    """Ratios of median times from one run: "mode:provider/products:dtype" (each provider over the bare products
    in the same dtype) and "mode:provider:dtype/float32" (a provider in another dtype over itself in float32)."""
    med = {(r["mode"], r["provider"], r["dtype"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    out = {}
    for (mode, name, dt), ms in med.items():
        if name != "products" and (mode, "products", dt) in med:
            out[f"{mode}:{name}/products:{dt}"] = ms / med[mode, "products", dt]
        if dt != "float32" and (mode, name, "float32") in med:
            out[f"{mode}:{name}:{dt}/float32"] = ms / med[mode, name, "float32"]
    return out


# --- reporting --------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "none"
    except OSError:
        commit = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    return {"device": name, "torch": torch.__version__, "triton": getattr(triton, "__version__", "none"),
            "commit": commit, "timestamp": datetime.datetime.now().isoformat(timespec="seconds")}


def _prog() -> str:
    # `bupo bench kernels` when the bupo command runs this (bupo.cli.COMMAND_NAME); bupo.kernels imports nothing else
    # of ours, so the name is read from the already imported module, if any
    return getattr(sys.modules.get("bupo.cli"), "COMMAND_NAME", None) or "python -m bupo.kernels.bench"


class _Parser(argparse.ArgumentParser):
    """A usage error is one `error: ...` line naming the flag (exit code 2), as in every bupo command."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; every option's default shown unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def parse_args(argv=None) -> argparse.Namespace:
    example = (f"bf16 vs fp32 on the CPU, each against its bare products (ratio lines after the table):\n  {_prog()} "
               "--shape custom --hidden 512 --vocab 151936 --tokens 2048 --dtype float32,bfloat16 --mode fwdbwd "
               "--providers torch,products")
    p = _Parser(prog=_prog(), description=__doc__.split("\n\n")[0], epilog=example, formatter_class=_HelpFormatter)
    p.add_argument("--shape", choices=[*SHAPES, "custom"], default="qwen3-4b", help="model whose H and V to use")
    p.add_argument("--hidden", type=int, help="H for --shape custom (no default)")
    p.add_argument("--vocab", type=int, help="V for --shape custom (no default)")
    p.add_argument("--tokens", type=int, help="N rows (default 16384 on CUDA, 256 on CPU)")
    p.add_argument("--dtype", default=None,
                   help=f"input dtype, one of {','.join(DTYPES)}, or a comma list of them timed side by side with "
                        "ratio lines (default bfloat16 on CUDA, float32 on CPU; on a CPU without bf16 units bf16 "
                        "products are emulated and slow)")
    p.add_argument("--mode", choices=["fwd", "fwdbwd", "both"], default="both",
                   help="forward only, forward + backward, or both")
    p.add_argument("--providers", default=DEFAULT_PROVIDERS, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per provider (default 10 CUDA, 3 CPU)")
    p.add_argument("--temperature", type=float, default=1.0, help="T of softmax(h W^T / T)")
    p.add_argument("--regime", choices=list(LOGIT_STD), default="normal",
                   help="logit spread: normal (std 2), peaked (std 40: denormal-prone), flat (std 0.01)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs (default: torch's)")
    p.add_argument("--csv", default=os.path.join("bupo", "kernels", "bench_results.csv"),
                   help="CSV file to append to (a relative path is taken from the current folder)")
    args = p.parse_args(argv)
    if args.shape == "custom" and (args.hidden is None or args.vocab is None):
        p.error("--shape custom needs --hidden and --vocab")
    unknown = set(args.providers.split(",")) - set(PROVIDERS)
    if unknown:
        p.error(f"--providers: unknown {sorted(unknown)}; valid: {','.join(PROVIDERS)}")
    dtypes = (args.dtype if args.dtype is not None else "float32").split(",")
    if set(dtypes) - set(DTYPES) or len(set(dtypes)) < len(dtypes):
        p.error(f"--dtype={args.dtype}: give one of {','.join(DTYPES)} or a comma list of them, each once")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    for name in ("hidden", "vocab", "tokens", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)}: must be >= 1")
    if args.temperature <= 0:
        raise ValueError(f"--temperature={args.temperature}: must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda but no CUDA device is available; use cpu or auto")
    folder = os.path.dirname(os.path.abspath(args.csv))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if os.path.isdir(args.csv) or not os.path.isdir(folder):  # checked now, not after the benchmark ran
        raise ValueError(f"--csv {args.csv}: give a file path whose folders exist or can be created")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    on_gpu = device.type == "cuda"
    H, V = (args.hidden, args.vocab) if args.shape == "custom" else SHAPES[args.shape]
    N = args.tokens or (16384 if on_gpu else 256)
    dtypes = (args.dtype or ("bfloat16" if on_gpu else "float32")).split(",")
    repeats = args.repeats or (10 if on_gpu else 3)
    env = environment(device)
    shown = str(getattr(torch, dtypes[0])) if len(dtypes) == 1 else ",".join(dtypes)
    print(f"# {args.shape} N={N} H={H} V={V} {shown} T={args.temperature} regime={args.regime} on {env['device']} "
          f"(torch {env['torch']}, triton {env['triton']}, commit {env['commit']})", flush=True)
    providers, rows = {}, []
    for name in args.providers.split(","):
        fn, ctx, reason = make_provider(name, device, args.temperature)
        if fn is None:
            print(f"# skip {name}: {reason}", flush=True)
            rows.append({"provider": name, "status": f"skip: {reason}"})
        else:
            providers[name] = fn, ctx
    inputs = {dt: make_inputs(N, H, V, getattr(torch, dt), device, args.regime) for dt in dtypes}
    for mode in (["fwd", "fwdbwd"] if args.mode == "both" else [args.mode]):
        res = run_mode(mode, providers, inputs, device, repeats)
        flops = (2 if mode == "fwd" else 8) * N * H * V
        for (name, dt), r in res.items():
            base = res.get(("naive", dt), {})
            if r["status"] == "ok":
                r["tflops_eq"] = flops / (r["median_ms"] * 1e-3) / 1e12
                if base.get("status") == "ok":
                    r["time_vs_naive"] = r["median_ms"] / base["median_ms"]
                    r["mem_vs_naive"] = r["act_mb"] / base["act_mb"] if base["act_mb"] > 0 else float("nan")
            rows.append({"provider": name, "mode": mode, "dtype": dt, **r})
    meta = {"shape": args.shape, "N": N, "H": H, "V": V, "dtype": ",".join(dtypes),
            "temperature": args.temperature, "regime": args.regime, **env}
    print_table(rows)
    ratio = ratios(rows)
    print_ratios(ratio)
    write_csv(args.csv, meta, rows)
    out = {"bench": "linear_logprob_entropy", **meta, "results": rows, "ratios": ratio,
           "goals": {k: f"{op} {bound}" for k, (op, bound) in GOALS.items() if k in ratio}}
    print(json.dumps(out, default=float))
    return out


COLUMNS = ["provider", "mode", "status", "median_ms", "p20_ms", "p80_ms", "tflops_eq", "act_mb", "time_vs_naive",
           "mem_vs_naive"]


def print_table(rows: list[dict]) -> None:
    print(f"{'provider':<14}{'mode':<8}{'dtype':<10}{'median ms':>11}{'p20 ms':>11}{'p80 ms':>11}{'TFLOP/s-eq':>11}"
          f"{'act MB':>10}{'t/naive':>9}{'mem/naive':>10}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['provider']:<14}{r.get('mode', '-'):<8}{r.get('dtype', '-'):<10}  {r['status']}")
            continue
        print(f"{r['provider']:<14}{r['mode']:<8}{r['dtype']:<10}{r['median_ms']:>11.1f}{r['p20_ms']:>11.1f}"
              f"{r['p80_ms']:>11.1f}{r['tflops_eq']:>11.4f}{r['act_mb']:>10.1f}{r.get('time_vs_naive', math.nan):>9.2f}"
              f"{r.get('mem_vs_naive', math.nan):>10.4f}")
    if any(r["provider"] == "products" for r in rows):
        print("(products: the bare matrix products of the fused path in that dtype, a timing floor; no log-probs)")


def print_ratios(ratio: dict[str, float]) -> None:
    for key, value in ratio.items():
        goal = ""
        if key in GOALS:
            op, bound = GOALS[key]
            met = value <= bound if op == "<=" else value < bound
            goal = f"  (goal {op} {bound}: {'met' if met else 'not met'})"
        print(f"ratio {key} = {value:.3f}{goal}")


def write_csv(path: str, meta: dict, rows: list[dict]) -> None:
    fields = [*meta, *COLUMNS]
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**meta, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}})


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bupo.cli.run_main's rule; bupo/kernels/ does not import bupo
        if os.environ.get("BUPO_TRACEBACK", "") not in ("", "0"):
            raise
        sys.exit(f"error: {e}")
