"""Phase-one vs full update step on the same rollout batch: `python -m bupo.bench.step`.

Times the trainer's own update (`update_policy`: packed forward, fused log-prob/entropy, backward, AdamW step) under
the same FSDP2 setup as training, once with the internal policy of layer k (BuPO phase one: layers 0..k only) and
once with the full policy, side by side in one run, and prints the ratio. The default model is a random
24-layer Llama-style config whose head is about 5% of the forward FLOPs; the issue's CPU target is a ratio <= 0.30
at k = 3. `--shape qwen3-0.6b` uses Qwen3-0.6B's config instead (random weights; 28 layers, tied head, V=151936):
    python -m bupo.bench.step --shape qwen3-0.6b --k 5 --device cuda --seqs 16 --prompt-len 256 --resp-len 768

--dtype is the compute dtype (FSDP2's param_dtype; the master weights and AdamW stay fp32) on every device. A comma
list times each step kind in each dtype in the same run, the dtypes' steps interleaved (one model per dtype, built
alike), and prints per step kind the ratio bf16 / fp32 (the issue's CPU goal: full step bf16 <= 0.4x fp32), and the
same ratio of the bare matrix products of a full step's decoder layers (their linear maps forward and backward,
plain torch.mm in each dtype, timed after the steps): what the device's bf16 units give the bulk of a step's FLOPs.
It is no bound: the rest of a step (the head's fused kernel, attention, norms, FSDP2's casts, AdamW on the fp32
masters) scales differently, and on this project's CPU gains less in bf16 or loses (SDPA's bf16 backward is slower
than its fp32 one, the casts are bf16-only work, AdamW is fp32 in both):
    bupo bench step --dtype bfloat16,float32
Last stdout line: one JSON object (with a comma list: the per-dtype results under "by_dtype", "ratios", and
"layer_products").
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from bupo import checkpoint, cli, models, parallel
from bupo.config import AlgoConfig
from bupo.kernels.bench import timed
from bupo.rollout.interface import Rollout
from bupo.update import is_phase_one_param, update_policy

# Real configs (random weights): what --shape picks instead of --layers/--hidden/--vocab.
SHAPES = {"qwen3-0.6b": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
                         "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                         "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
                         "tie_word_embeddings": True}}
CUSTOM_DEFAULTS = {"layers": 24, "hidden": 512, "vocab": 8192}
DTYPES = ("bfloat16", "float32")
GOALS = {"full:bfloat16/float32": 0.4}  # issue 20, on the CPU: a ratio <= this


def tiny_config(layers: int, hidden: int, vocab: int) -> dict:
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 3 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": max(hidden // 64, 1),
            "num_key_value_heads": max(hidden // 128, 1), "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "max_position_embeddings": 4096, "tie_word_embeddings": False}


def flops_per_token(cfg: dict) -> tuple[float, float]:
    """(decoder layers, head) forward FLOPs per token (2 x multiply-adds of the matmuls)."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    attn = h * d * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    return 2.0 * cfg["num_hidden_layers"] * (attn + 3 * h * i), 2.0 * h * cfg["vocab_size"]


def make_batch(n_seqs: int, prompt_len: int, resp_len: int, vocab: int, seed: int = 0) -> list[Rollout]:
    g = torch.Generator().manual_seed(seed)
    return [Rollout(torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
                torch.randint(0, vocab, (resp_len,), generator=g).tolist(),
                advantage=float(torch.randn((), generator=g))) for _ in range(n_seqs)]


def layer_shapes(cfg: dict) -> dict[tuple[int, int], int]:
    """{(in, out): how many linear maps of that shape} over the decoder layers (q, k, v, o, gate, up, down)."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes: dict[tuple[int, int], int] = {}
    for shape, n in (((h, nq), L), ((h, nkv), 2 * L), ((nq, h), L), ((h, i), 2 * L), ((i, h), L)):
        shapes[shape] = shapes.get(shape, 0) + n
    return shapes


def time_layer_products(cfg: dict, tokens: int, dtypes: list[str], repeats: int, device) -> dict[str, float]:
    """What bf16 units give a full update step's decoder layers: the bare matrix products of their linear maps for
    `tokens` rows, forward x W^T ([N, in] x [in, out]) and backward dy W and dy^T x, as plain torch.mm in each dtype
    (a bf16 product returns bf16: the hardware's bare bf16 speed), dtypes interleaved -> {dtype: seconds of one step's
    layer products}, the median of `repeats` rounds. Each shape runs enough times per round for ~10 ms (sized in a
    warm-up round), so small models time more than clock noise. The head is left out (its products run in the fused
    kernel, whose logit products return fp32: `bupo bench kernels` times them), as are attention scores, norms,
    FSDP2's casts and the optimizer."""
    g = torch.Generator().manual_seed(0)
    shapes = layer_shapes(cfg)
    data = {dt: {(a, b): (torch.randn(tokens, a, generator=g).to(device, getattr(torch, dt)),  # x [N, in]
                          torch.randn(b, a, generator=g).to(device, getattr(torch, dt)),  # W [out, in]
                          torch.randn(tokens, b, generator=g).to(device, getattr(torch, dt)))  # dy [N, out]
                 for a, b in shapes} for dt in dtypes}
    calls = dict.fromkeys(shapes, 1)  # per shape: calls per timing, set in the warm-up round
    times: dict[str, list[float]] = {dt: [] for dt in dtypes}
    for r in range(repeats + 1):
        for dt in dtypes:
            total = 0.0
            for shape, n in shapes.items():
                x, w, dy = data[dt][shape]
                k = calls[shape]
                seconds = timed(lambda: [(x @ w.T, dy @ w, dy.T @ x) for _ in range(k)], device) / k
                if r == 0:
                    calls[shape] = max(calls[shape], math.ceil(0.01 / max(seconds, 1e-7)))
                total += n * seconds
            times[dt].append(total)
    return {dt: statistics.median(t[1:]) for dt, t in times.items()}


def time_steps(runs: dict, seqs, info, layer, k, repeats: int, token_budget: int) -> dict[str, list[float]]:
    """runs: {dtype name: (model, opt)} -> {dtype name: step times}; the runs' steps are interleaved, so a busy
    machine slows each alike."""
    algo = AlgoConfig(micro_batch_tokens=token_budget, clip_low=0.2, clip_high=0.2, dual_clip=10.0)
    trainable = {dt: [p for n, p in model.named_parameters() if is_phase_one_param(n, k)] if layer is not None
                 else None for dt, (model, _) in runs.items()}
    times = {dt: [] for dt in runs}
    for _ in range(repeats + 1):  # first call is warm-up
        for dt, (model, opt) in runs.items():
            t0 = time.perf_counter()
            update_policy(model, opt, seqs, algo, info=info, mini_batches=1, layer=layer, grad_clip=1.0,
                          trainable=trainable[dt])
            times[dt].append(time.perf_counter() - t0)
    return {dt: t[1:] for dt, t in times.items()}


def build(cfg: dict, info, dtype: str) -> tuple:
    """(model, AdamW) as the trainer sets them up: fp32 master weights, FSDP2 computing in `dtype`."""
    torch.manual_seed(0)
    model = models.build_model(cfg, dtype=torch.float32, device=info.device)
    parallel.apply_fsdp(model, info, param_dtype=getattr(torch, dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    checkpoint.init_adamw_state(opt)
    return model, opt


def model_config(args: argparse.Namespace) -> dict:
    """The HF config to build; fills args.layers/hidden/vocab (a --shape preset fixes them: giving one is an error)."""
    if args.shape == "custom":
        for name, default in CUSTOM_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        return tiny_config(args.layers, args.hidden, args.vocab)
    given = [f"--{name}" for name in CUSTOM_DEFAULTS if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: --shape {args.shape} fixes the model; use --shape custom to set them")
    cfg = SHAPES[args.shape]
    args.layers, args.hidden, args.vocab = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    return dict(cfg)


def main(argv: list[str] | None = None) -> dict:
    prog = cli.prog("bupo.bench.step")
    example = f"bf16 vs fp32 in one run (ratio lines after the table):\n  {prog} --dtype bfloat16,float32"
    p = cli.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=example)
    p.add_argument("--shape", choices=["custom", *SHAPES], default="custom",
                   help="custom: a random Llama-style model of --layers/--hidden/--vocab; else that model's config")
    p.add_argument("--layers", type=int, help="--shape custom (default 24)")
    p.add_argument("--hidden", type=int, help="--shape custom (default 512)")
    p.add_argument("--vocab", type=int, help="--shape custom (default 8192: the head is ~5%% of forward FLOPs)")
    p.add_argument("--k", type=int, default=3, help="internal layer (0-based)")
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--resp-len", type=int, default=192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="bfloat16",
                   help="compute dtype on every device (FSDP2 param_dtype; master weights fp32): bfloat16 or "
                        "float32, or the comma list bfloat16,float32 to time both in one run with bf16/fp32 ratios "
                        "and the ratio of the decoder layers' bare matrix products (a few seconds more) "
                        "(on a CPU without bf16 units bf16 is emulated and slow)")
    args = p.parse_args(argv)
    dtypes = args.dtype.split(",")
    if set(dtypes) - set(DTYPES) or len(set(dtypes)) < len(dtypes):
        p.error(f"--dtype={args.dtype}: give {' or '.join(DTYPES)} or a comma list of them, each once")
    cfg = model_config(args)
    for name in ("layers", "hidden", "vocab", "seqs", "prompt_len", "resp_len", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if not 0 <= args.k < args.layers:
        raise ValueError(f"--k={args.k} must be in 0..{args.layers - 1} (--layers={args.layers})")
    heads = max(args.hidden // 64, 1)
    if args.shape == "custom" and (args.hidden % heads or args.hidden // heads % 2):
        raise ValueError(f"--hidden={args.hidden}: the model has {heads} heads, so it must be a multiple of "
                         f"{2 * heads} (an even head size)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda but no CUDA device is available; use cpu or auto")
    info = parallel.init_distributed(args.device)
    body, head = flops_per_token(cfg)
    seqs = make_batch(args.seqs, args.prompt_len, args.resp_len, args.vocab)
    results = {}  # {(step kind, dtype): times}
    for name, layer in (("phase_one", args.k), ("full", None)):
        runs = {dt: build(cfg, info, dt) for dt in dtypes}  # the dtypes' models live together, one step kind at a time
        for dt, times in time_steps(runs, seqs, info, layer, args.k, args.repeats, token_budget=1 << 30).items():
            results[name, dt] = times
        del runs
    med = {key: statistics.median(v) for key, v in results.items()}
    ideal = ((args.k + 1) / args.layers * body + head) / (body + head)
    by_dtype = {dt: {"ratio": med["phase_one", dt] / med["full", dt], "phase_one_s": med["phase_one", dt],
                     "full_s": med["full", dt]} for dt in dtypes}
    ratios = {f"{name}:bfloat16/float32": med[name, "bfloat16"] / med[name, "float32"]
              for name in ("phase_one", "full") if len(dtypes) == 2}
    layers = None
    if len(dtypes) == 2:
        products = time_layer_products(cfg, args.seqs * (args.prompt_len + args.resp_len), dtypes, args.repeats,
                                       info.device)
        layers = {"bfloat16_s": products["bfloat16"], "float32_s": products["float32"],
                  "ratio": products["bfloat16"] / products["float32"]}
    if info.is_main:
        print(f"model: {args.shape}, {args.layers} layers, H={args.hidden}, V={args.vocab}; "
              f"head = {head / (body + head):.1%} of forward FLOPs; "
              f"batch {args.seqs} x ({args.prompt_len} + {args.resp_len}) tokens; {info.device}")
        print_report(results, med, by_dtype, ratios, args.k, ideal)
        if layers is not None:
            print(f"decoder layers' matrix products alone (bare torch.mm, forward and backward), bf16 / fp32: "
                  f"{layers['ratio']:.3f} ({layers['bfloat16_s']:.4g} s / {layers['float32_s']:.4g} s)")
    common = {"layers": args.layers, "k": args.k, "hidden": args.hidden, "vocab": args.vocab,
              "device": str(info.device), "torch": torch.__version__, "shape": args.shape}
    tokens = args.seqs * (args.prompt_len + args.resp_len)
    if len(dtypes) == 1:  # the single-dtype keys, as gpu_check and its report read them
        r = by_dtype[dtypes[0]]
        out = {"ratio": r["ratio"], "flop_ratio": ideal, "phase_one_s": r["phase_one_s"], "full_s": r["full_s"],
               **common, "dtype": dtypes[0], "tokens": tokens}
    else:
        out = {"flop_ratio": ideal, **common, "dtype": args.dtype, "tokens": tokens, "by_dtype": by_dtype,
               "ratios": ratios, "goals": {k: f"<= {bound}" for k, bound in GOALS.items() if k in ratios},
               "layer_products": layers}
    if info.is_main:
        print(json.dumps(out))
    parallel.destroy(wait=True)
    return out


def print_report(results: dict, med: dict, by_dtype: dict, ratios: dict, k: int, ideal: float) -> None:
    """The table of step times, phase-one / full per dtype, and with two dtypes the bf16 / fp32 ratio lines."""
    several = len(by_dtype) > 1
    print("| step | median s | min s | max s |\n|---|---|---|---|")
    for (name, dt), v in results.items():
        print(f"| {name} (layer {'k=' + str(k) if name == 'phase_one' else 'all'}){' ' + dt if several else ''} | "
              f"{med[name, dt]:.3f} | {min(v):.3f} | {max(v):.3f} |")
    for dt, r in by_dtype.items():
        print(f"phase-one / full step time{', ' + dt if several else ''}: {r['ratio']:.3f} "
              f"(FLOP ratio {ideal:.3f}; target <= 0.30 at k=3)")
    for key, value in ratios.items():
        bound = GOALS.get(key)
        goal = "" if bound is None else f" (goal <= {bound}: {'met' if value <= bound else 'not met'})"
        name, dts = key.split(":")
        print(f"{name} step time {dts.replace('/', ' / ')}: {value:.3f}{goal}")


if __name__ == "__main__":
    from bupo.cli import run_main

    run_main(main)
    parallel.exit_process()
