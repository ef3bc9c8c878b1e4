"""avg@n and unbiased pass@k on math eval sets.

    python -m bupo.evals.passk --model smollm2 --data arithmetic --n 16 --max-new-tokens 128 --out runs/passk
    python -m bupo.evals.passk --model DIR --data amc2023 math500 --n 16 --engine vllm --out runs/eval

Samples n responses per problem (T, top-p as given), scores them with the trainer's reward (bupo.reward), and
reports per dataset and overall (the mean over datasets, as the paper averages benchmarks):
avg@n = mean score, and pass@k = mean over problems of 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), c = correct
samples of the problem. Generations are appended to <out>/generations.jsonl one batch at a time; a rerun with the
same settings skips what is there (a crash loses at most the batch in flight; a truncated last line is dropped).
Seeding (bupo.rollout.interface's one scheme): sample j of problem i of a dataset draws its uniforms from
sequence_seed(step_seed(seed, "passk/<dataset>", 0), i, j), whatever the batching or the order of runs. A resumed
run generates the same fixed batches as an uninterrupted one, so it samples the same texts; another --batch-size
samples the same texts only up to near-ties of the logits (bupo.rollout.builtin), or exactly with --max-batch-size 1.
Writes <out>/passk.json, <out>/passk.png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

from bupo import cli
from bupo.metrics import plot_text

SETTINGS = ("model", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "enable_thinking",
            "max_prompt_length", "chat_template", "seed_scheme", "dtype")
# settings added after the first release: a settings file without one was written with the value they stand for
# then (dtype: bf16 on CUDA, fp32 on a CPU, i.e. what --dtype auto resolves to on this machine)
# How samples are seeded, recorded with the settings. 1 (files without the key, written before it existed): one
# seed per batch of problems, from the batch's first problem; 2: per sample, the scheme of bupo.rollout.interface.
SEED_SCHEME = 2


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate 1 - C(n-c, k) / C(n, k) for n samples of which c are correct.

    Product form C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i), summed in log space (log1p) and closed with
    expm1, so it neither overflows nor loses precision at n = 300, k = 256. ValueError unless
    0 <= c <= n and 1 <= k <= n (ints).
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"pass_at_k: {name}={v!r} must be an int")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    log_fail = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return -math.expm1(log_fail)


# --- generations file --------------------------------------------------------------------------------------------

def read_generations(path: Path) -> dict[tuple[str, int, int], dict]:
    """Rows keyed by (dataset, problem, sample). A last line without its newline (a crash mid-write) is cut off
    the file; any other unreadable line is a ValueError naming it."""
    from bupo.metrics import jsonl_rows

    rows = {}
    for i, r in jsonl_rows(path, cut_partial=True):
        try:
            key = (str(r["dataset"]), int(r["problem"]), int(r["sample"]))
            float(r["score"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} line {i}: not a generation row ({type(e).__name__}: {e}); "
                             "fix or remove the line, or use a fresh --out") from None
        rows[key] = r
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """One write per batch, flushed to disk, so a crash loses at most this batch."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def check_settings(out: Path, settings: dict, added: dict | None = None) -> None:
    """The first run records the sampling settings; a rerun into the same --out must use the same ones. `added`:
    the values that settings added later stand for in a file written before them."""
    added = added or {}
    path = out / "passk_settings.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid JSON file ({e}); delete it or use a fresh --out") from None
        if not isinstance(old, dict):
            raise ValueError(f"{path}: expected a JSON object; delete it or use a fresh --out")
        scheme = old.get("seed_scheme", 1)
        if scheme != settings["seed_scheme"]:
            raise ValueError(f"--out {out} holds generations drawn with seeding scheme {scheme} (an earlier "
                             f"bupo.evals.passk: one seed per batch of problems); this version seeds each sample from "
                             f"(seed, dataset, problem, sample) (scheme {settings['seed_scheme']}), so new samples "
                             "would not be the ones that run would have drawn. Use a fresh --out, or delete the "
                             "old one to start over")
        diff = {k: (old.get(k, added.get(k)), settings[k]) for k in SETTINGS if old.get(k, added.get(k)) != settings[k]}
        if diff:
            raise ValueError(f"--out {out} holds generations made with other settings {diff} (old, new); "
                             "use a fresh --out or the same settings")
    else:
        path.write_text(json.dumps(settings, indent=1))


# --- data and engine ---------------------------------------------------------------------------------------------

def load_problems(names: list[str], tok, args) -> dict[str, list]:
    from bupo.data import arithmetic_rows, load_rows, render_prompts
    from bupo.tokenizer import compile_template

    template = read_template(args.chat_template) if args.chat_template else None
    if template is not None:
        compile_template(template, f"--chat-template {args.chat_template}")
    out = {}
    for name in names:
        if name == "arithmetic":
            rows = arithmetic_rows(args.arithmetic_size, args.seed)
        else:
            rows, _ = load_rows(name, "--data")
        prompts, stats = render_prompts(rows, tok, max_prompt_length=args.max_prompt_length, truncation="drop",
                                        enable_thinking=args.enable_thinking, template=template)
        if stats["dropped"]:
            warnings.warn(f"{name}: {stats['dropped']} prompts longer than --max-prompt-length="
                          f"{args.max_prompt_length} are left out")
        out[name] = prompts[: args.max_prompts] if args.max_prompts else prompts
        print(f"[data] {name}: {len(out[name])} problems", flush=True)
    return out


def read_template(path: str) -> str:
    """The text of a --chat-template file."""
    if not Path(path).is_file():
        raise ValueError(f"--chat-template {path}: no such file (give a file holding a Jinja chat template)")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--chat-template {path}: not UTF-8 text ({e})") from None


def engine_dtype(name: str) -> str:
    """--dtype resolved on this machine: auto is bfloat16 on CUDA and float32 on a CPU."""
    import torch

    if name == "auto":
        return "bfloat16" if torch.cuda.is_available() else "float32"
    return name


def make_engine(kind: str, path: Path, tok, args):
    """bupo.rollout.engine.make_engine from the command line, in --dtype."""
    import torch

    from bupo.rollout.engine import make_engine as engine_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return engine_for(kind, path, device=device, dtype=getattr(torch, engine_dtype(args.dtype)),
                      vocab_size=tok.vocab_size, max_batch_size=args.max_batch_size, seed=args.seed,
                      gpu_memory_utilization=args.gpu_memory_utilization,
                      tensor_parallel_size=args.tensor_parallel_size,
                      max_model_len=args.max_prompt_length + args.max_new_tokens, flag="--engine")


# --- generation --------------------------------------------------------------------------------------------------

def plan_batches(problems: dict[str, list], n: int, batch_size: int, have: dict) -> list[tuple[str, list, dict]]:
    """Fixed batches of max(1, batch_size // n) problems per dataset; each with its missing sample indices."""
    per = max(1, batch_size // n)
    out = []
    for name, prompts in problems.items():
        for s in range(0, len(prompts), per):
            group = prompts[s:s + per]
            missing = {p.row.index: [j for j in range(n) if (name, p.row.index, j) not in have] for p in group}
            if any(missing.values()):
                out.append((name, group, missing))
    return out


def generate_batch(engine, tok, name: str, group: list, missing: dict, args) -> list[dict]:
    """The missing samples of the problems in `group`, scored. Each problem with a missing sample is generated in
    full (n samples, seed_index = its problem index) and only the missing ones are kept: they are what any other
    run draws for them (module docstring), also for a problem a crash cut short."""
    from bupo.reward import score_batch
    from bupo.rollout.interface import SamplingParams, step_seed

    todo = [p for p in group if missing[p.row.index]]
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, stop_token_ids=tuple(tok.stop_token_ids),
                            seed=step_seed(args.seed, f"passk/{name}", 0),
                            seed_index=tuple(p.row.index for p in todo))
    rollouts = engine.generate([p.ids for p in todo], params)
    jobs = [(todo[s.prompt_index], s) for s in rollouts if s.sample_index in missing[todo[s.prompt_index].row.index]]
    texts = tok.decode_batch([s.response_ids for _, s in jobs])
    results = score_batch(texts, [p.row.ground_truth for p, _ in jobs], in_think=[p.in_think for p, _ in jobs])
    rows = []
    for (p, s), text, res in zip(jobs, texts, results, strict=True):
        row = {"dataset": name, "problem": p.row.index, "sample": s.sample_index, "prompt_tokens": len(s.prompt_ids),
               "response_tokens": len(s.response_ids), "finished": s.finished, "score": res.score,
               "reason": res.reason, "response": text}
        if args.save_token_ids:
            row["response_ids"] = list(s.response_ids)
        rows.append(row)
    return rows


# --- report ------------------------------------------------------------------------------------------------------

def report(problems: dict[str, list], rows: dict, n: int, ks: list[int]) -> dict:
    """Per dataset: problems, avg@n, pass@k, mean response length, truncated fraction; overall: mean over datasets."""
    out = {"n": n, "k": ks, "datasets": {}}
    for name, prompts in problems.items():
        if not prompts:
            continue
        scores = [[rows[(name, p.row.index, j)]["score"] for j in range(n)] for p in prompts]
        flat = [r for p in prompts for r in (rows[(name, p.row.index, j)] for j in range(n))]
        out["datasets"][name] = {
            "problems": len(prompts), "samples": len(flat),
            "avg": sum(map(sum, scores)) / (n * len(prompts)),
            "pass@k": {str(k): sum(pass_at_k(n, sum(s > 0 for s in ss), k) for ss in scores) / len(prompts)
                       for k in ks},
            "mean_response_tokens": sum(r["response_tokens"] for r in flat) / len(flat),
            "truncated_frac": sum(not r["finished"] for r in flat) / len(flat),
        }
    ds = list(out["datasets"].values())
    if ds:
        out["overall"] = {"datasets": len(ds), "avg": sum(d["avg"] for d in ds) / len(ds),
                          "pass@k": {str(k): sum(d["pass@k"][str(k)] for d in ds) / len(ds) for k in ks}}
    return out


def markdown(rep: dict) -> str:
    n, ks = rep["n"], rep["k"]
    head = ["dataset", "problems", f"avg@{n}"] + [f"pass@{k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    items = list(rep["datasets"].items())
    if "overall" in rep:
        items.append(("overall (mean of datasets)", {**rep["overall"], "problems": "-"}))
    for name, d in items:
        cells = [name, str(d["problems"]), f"{100 * d['avg']:.2f}"] + [f"{100 * d['pass@k'][str(k)]:.2f}" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    ks = rep["k"]
    for name, d in rep["datasets"].items():
        ax.plot(ks, [100 * d["pass@k"][str(k)] for k in ks], marker="o", label=plot_text(Path(name).stem))
    top = max((100 * v for d in rep["datasets"].values() for v in d["pass@k"].values()), default=0.0)
    ax.set_ylim(0, max(1.0, min(100.0, 1.08 * top)))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.set_title(f"pass@k (n = {rep['n']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------------------------

def parse_ks(text: str, n: int) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--k={text!r}: expected comma-separated ints, e.g. 1,4,16") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--k={text!r}: every k must be >= 1")
    return sorted({min(k, n) for k in ks})  # capped at n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog=cli.prog("bupo.evals.passk"), description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model folder, or 'smollm2'")
    p.add_argument("--data", nargs="+", required=True,
                   help="dataset names (amc2023, math500, aime_2024, aime_2025, 'arithmetic') or parquet paths")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=16, help="samples per problem")
    p.add_argument("--k", default="1,4,16,64,256", help="comma-separated k values, capped at n")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--max-new-tokens", type=int, default=8192)
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help="longer prompts are left out (warned); default: 2048, or less where the model's context "
                        "(max_position_embeddings) minus --max-new-tokens is less. Prompt + response must fit in "
                        "the context (checked before any work)")
    p.add_argument("--engine", choices=("builtin", "vllm", "auto"), default="auto")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="the engine's compute dtype; auto: bfloat16 on CUDA, float32 on a CPU (bfloat16 there uses "
                        "its bf16 matrix units where it has them, logits stay fp32)")
    p.add_argument("--max-prompts", type=int, default=0, help="first N problems of each dataset (0: all)")
    p.add_argument("--arithmetic-size", type=int, default=64, help="problems of the built-in 'arithmetic' set")
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="Qwen3 chat template switch (default: the template's own)")
    p.add_argument("--chat-template", default="", help="file with a raw Jinja chat template (base models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256, help="samples per generate call (whole problems)")
    p.add_argument("--max-batch-size", type=int, default=64, help="built-in engine: sequences decoded at once")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM")
    p.add_argument("--save-token-ids", action="store_true", help="also store response token ids in the jsonl")
    p.add_argument("--max-batches", type=int, default=0, help="debug: stop after this many new batches")
    args = p.parse_args(argv)
    for name in ("n", "max_new_tokens", "max_prompt_length", "batch_size", "max_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    cli.check_flag("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]")
    cli.check_flag("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0,
                   "a finite number >= 0 (0: greedy)")
    cli.check_flag("--top-k", args.top_k, args.top_k >= -1, "-1 or 0 (off) or a positive count")
    cli.check_flag("--max-prompts", args.max_prompts, args.max_prompts >= 0, ">= 0 (0: all)")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    ks = parse_ks(args.k, args.n)
    from bupo.cli import check_out_dir
    from bupo.evals import context_length, resolve_model
    from bupo.reward import shutdown
    from bupo.tokenizer import Tokenizer

    path = resolve_model(args.model)
    args.max_prompt_length = cli.prompt_budget(args.max_prompt_length, 2048, context_length(path), args.max_new_tokens,
                                               new="--max-new-tokens", model=f"--model {args.model}")
    check_out_dir(args.out, "--out")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": str(path), "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                "max_new_tokens": args.max_new_tokens, "seed": args.seed, "enable_thinking": args.enable_thinking,
                "max_prompt_length": args.max_prompt_length, "chat_template": args.chat_template,
                "seed_scheme": SEED_SCHEME, "dtype": engine_dtype(args.dtype)}
    check_settings(out, settings, added={"dtype": engine_dtype("auto")})
    tok = Tokenizer.from_pretrained(path)
    problems = load_problems(args.data, tok, args)
    gen_path = out / "generations.jsonl"
    have = read_generations(gen_path)
    batches = plan_batches(problems, args.n, args.batch_size, have)
    total = sum(len(ps) for ps in problems.values()) * args.n
    todo = sum(len(m) for _, _, ms in batches for m in ms.values())
    print(f"[passk] {total - todo}/{total} samples already in {gen_path}; {len(batches)} batches to run", flush=True)
    engine = make_engine(args.engine, path, tok, args) if batches else None
    t0 = time.time()
    for b, (name, group, missing) in enumerate(batches):
        if args.max_batches and b >= args.max_batches:
            print(f"[passk] stopping after {b} batches (--max-batches); rerun to continue", flush=True)
            return None
        rows = generate_batch(engine, tok, name, group, missing, args)
        append_rows(gen_path, rows)
        have.update(((r["dataset"], r["problem"], r["sample"]), r) for r in rows)
        acc = sum(r["score"] for r in rows) / len(rows)
        print(f"[passk] batch {b + 1}/{len(batches)} {name} problems {group[0].row.index}..{group[-1].row.index}: "
              f"{len(rows)} samples, acc {acc:.3f}, {time.time() - t0:.0f}s", flush=True)
    shutdown()
    rep = report(problems, have, args.n, ks)
    rep["settings"] = settings
    (out / "passk.json").write_text(json.dumps(rep, indent=1))
    plot(rep, out / "passk.png")
    print(markdown(rep), flush=True)
    print(f"[passk] wrote {out / 'passk.json'} and {out / 'passk.png'}", flush=True)
    return rep


if __name__ == "__main__":
    from bupo.cli import run_main

    run_main(main)
