"""Internal-policy entropy flow through the layers (paper Figs. 2-3) and the boundary layer.

    bupo entropy-flow --model smollm2 --data arithmetic --num-prompts 32 --max-new-tokens 64 --out runs/ef
    bupo entropy-flow --model DIR --samples samples.jsonl --out runs/ef [--norm] [--tokenizer-vocab]

Input: either --samples FILE.jsonl with rows {"prompt_ids": [...], "response_ids": [...]}, or a dataset
(a name, a parquet path or 'arithmetic') whose first --num-prompts prompts (after a --seed shuffle) get one response
each from the built-in engine; those are written to <out>/samples.jsonl in the same row form.
Output: <out>/entropy_flow.json (bupo.analysis.entropy_flow's dict), <out>/entropy_flow.png (Fig. 2: entropy of
the layer and module states through the layers) and <out>/entropy_change.png (Fig. 3: per-layer entropy change of
ATTN and FFN, boundary layer marked). Layers are 0-based everywhere (paper layer = l + 1), the axes say so.
The policies are softmaxes over every row of the unembedding, or with --tokenizer-vocab over the tokenizer's ids only
(what the trainer's internal_layer='auto' and the trained policy use, when a checkpoint pads its embedding).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from bupo import cli, models
from bupo.evals import load_model, pick_device, resolve_model  # noqa: F401 (pick_device: re-exported)
from bupo.metrics import plot_text
from bupo.rollout.interface import Rollout

XLABEL = "layer l (0-based; paper layer = l + 1)"


# --- samples -----------------------------------------------------------------------------------------------------

def _ids(row: dict, field: str, where: str, vocab_size: int) -> list[int]:
    if field not in row:
        raise ValueError(f"{where}: missing field {field!r}")
    ids = row[field]
    if not isinstance(ids, list):
        raise ValueError(f"{where}: field {field!r} must be a list of token ids, got {type(ids).__name__}")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"{where}: field {field!r} holds {t!r}; token ids are ints in [0, {vocab_size})")
    return ids


def read_samples(path: str | Path, vocab_size: int, max_positions: int | None = None) -> list[Rollout]:
    """Rollouts (prompt_ids, response_ids) from a jsonl file; ValueError naming the line and field of a bad row, and
    the line of a row longer than the model's context (max_positions: max_position_embeddings)."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:  # a non-UTF-8 line fails as "not valid JSON"
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object with prompt_ids and response_ids")
            prompt = _ids(row, "prompt_ids", where, vocab_size)
            if not prompt:
                raise ValueError(f"{where}: field 'prompt_ids' is empty")
            out.append(Rollout(prompt, _ids(row, "response_ids", where, vocab_size)))
            if max_positions is not None and len(out[-1]) > max_positions:
                raise ValueError(f"{where}: prompt_ids + response_ids = {len(out[-1])} tokens exceed the model's "
                                 f"context, max_position_embeddings={max_positions} (config.json)")
    if not out:
        raise ValueError(f"{path}: no samples")
    return out


def generate_samples(model, tok, args) -> list[Rollout]:
    from bupo.data import arithmetic_rows, load_rows, render_prompts
    from bupo.rollout.builtin import BuiltinEngine
    from bupo.rollout.interface import SamplingParams

    if args.data == "arithmetic":
        rows = arithmetic_rows(args.num_prompts, args.seed)
    else:
        rows, _ = load_rows(args.data, "--data")
        rows = random.Random(args.seed).sample(rows, min(args.num_prompts, len(rows)))
    prompts, _ = render_prompts(rows, tok, max_prompt_length=args.max_prompt_length,
                                enable_thinking=args.enable_thinking)
    params = SamplingParams(n=1, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, stop_token_ids=tuple(tok.stop_token_ids))
    t0 = time.time()
    print(f"[entropy_flow] generating {len(prompts)} responses (max {args.max_new_tokens} tokens)", flush=True)
    engine = BuiltinEngine(model, max_batch_size=args.max_batch_size, vocab_size=tok.vocab_size)
    out = engine.generate([p.ids for p in prompts], params)
    print(f"[entropy_flow] generated {sum(len(s.response_ids) for s in out)} tokens in {time.time() - t0:.1f}s",
          flush=True)
    return out


def write_samples(path: Path, samples: list[Rollout]) -> None:
    path.write_text("".join(json.dumps({"prompt_ids": list(s.prompt_ids), "response_ids": list(s.response_ids)})
                            + "\n" for s in samples))


# --- plots -------------------------------------------------------------------------------------------------------

def _mark(ax, k: int | None) -> None:
    if k is not None:
        ax.axvline(k, color="k", ls="--", lw=0.9, label=f"boundary layer {k} (paper {k + 1})")
    else:
        ax.text(0.01, 0.02, "no layer has a mean FFN entropy change > 0: no boundary layer", fontsize=7,
                transform=ax.transAxes)


def plot_flow(flow: dict, path: Path, title: str) -> None:
    """Fig. 2 style: H(h_{l-1}), H(h_l) (left) and the attention / FFN states (right) per layer."""
    import matplotlib.pyplot as plt

    x = list(range(flow["num_layers"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100, sharex=True)
    for key, label in (("layer_in", "layer input $h_{l-1}$"), ("layer_out", "layer output $h_l$")):
        axes[0].plot(x, flow[key], marker=".", label=label)
    for key, label in (("attn_in", "attn input"), ("attn_out", "attn output $A_l$"),
                       ("ffn_in", "FFN input"), ("ffn_out", "FFN output $F_l$")):
        axes[1].plot(x, flow[key], marker=".", label=label)
    for ax, t in zip(axes, ("internal layer policy", "internal modular policies")):
        _mark(ax, flow["boundary_layer"])
        ax.set_xlabel(XLABEL)
        ax.set_ylabel("entropy (nats)")
        ax.set_title(t, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(plot_text(title), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_change(flow: dict, path: Path, title: str) -> None:
    """Fig. 3 style: bars of the per-layer entropy change of ATTN and FFN."""
    import matplotlib.pyplot as plt

    L = flow["num_layers"]
    fig, ax = plt.subplots(figsize=(10, 3.4), dpi=100)
    ax.bar([l - 0.2 for l in range(L)], flow["delta_attn"], width=0.4, label="ATTN  $H(A_l) - H(attn\\ in)$")
    ax.bar([l + 0.2 for l in range(L)], flow["delta_ffn"], width=0.4, label="FFN  $H(F_l) - H(ffn\\ in)$")
    ax.axhline(0, color="k", lw=0.6)
    _mark(ax, flow["boundary_layer"])
    ax.set_xlabel(XLABEL)
    ax.set_ylabel("entropy change (nats)")
    ax.set_xticks(range(0, L, max(1, L // 16)))
    ax.set_title(plot_text(title), fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(flow: dict) -> str:
    lines = ["| layer | H(h_l-1) | H(h_l) | dH layer | dH attn | dH ffn |", "|---|---|---|---|---|---|"]
    for l in range(flow["num_layers"]):
        vals = [flow[k][l] for k in ("layer_in", "layer_out", "delta_layer", "delta_attn", "delta_ffn")]
        lines.append(f"| {l} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog=cli.prog("bupo.evals.entropy_flow"), description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model folder, or 'smollm2'")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="jsonl with prompt_ids / response_ids rows")
    src.add_argument("--data", help="dataset name (math500, ..., 'arithmetic') or parquet path to sample from")
    p.add_argument("--out", required=True)
    p.add_argument("--norm", action="store_true", help="apply the final norm to every state (paper ablation)")
    p.add_argument("--tokenizer-vocab", action="store_true",
                   help="softmax over the tokenizer's ids only, as the trained policy (default: every embedding row)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help="longer prompts keep their last tokens; default: 1024, or less where the model's context "
                        "(max_position_embeddings) minus --max-new-tokens is less. Prompt + response must fit in "
                        "the context (checked before any work, also for every --samples row)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-batch-size", type=int, default=64, help="built-in engine: sequences decoded at once")
    p.add_argument("--batch-tokens", type=int, default=0, help="tokens per analysis micro-batch (0: auto)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    for name in ("num_prompts", "max_new_tokens", "max_prompt_length", "max_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.samples is not None and not Path(args.samples).is_file():  # checked before the model is loaded
        what = "not a file" if Path(args.samples).exists() else "no such file"
        raise ValueError(f"--samples {args.samples}: {what} (give a jsonl of prompt_ids / response_ids rows)")
    cli.check_flag("--batch-tokens", args.batch_tokens, args.batch_tokens >= 0, ">= 0")
    cli.check_flag("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0,
                   "a finite number >= 0")
    cli.check_flag("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> dict:
    from bupo.analysis import entropy_flow
    from bupo.tokenizer import Tokenizer

    args = parse_args(argv)
    path = resolve_model(args.model)
    meta = models.build_meta(path).config  # config.json only: the context is checked before any work
    samples = None
    if args.samples:
        samples = read_samples(args.samples, meta.vocab_size, max_positions=meta.max_position_embeddings)
    else:
        args.max_prompt_length = cli.prompt_budget(args.max_prompt_length, 1024, meta.max_position_embeddings,
                                                   args.max_new_tokens, new="--max-new-tokens",
                                                   model=f"--model {args.model}")
    path, model = load_model(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_pretrained(path) if args.tokenizer_vocab or not args.samples else None
    if samples is None:
        samples = generate_samples(model, tok, args)
        write_samples(out / "samples.jsonl", samples)
        print(f"[entropy_flow] wrote {out / 'samples.jsonl'}", flush=True)
    t0 = time.time()

    def progress(done: int, total: int) -> None:
        print(f"[entropy_flow] analysed {done}/{total} samples, {time.time() - t0:.1f}s", flush=True)

    flow = entropy_flow(model, samples, norm=args.norm, batch_tokens=args.batch_tokens or None, progress=progress,
                        vocab_size=tok.vocab_size if args.tokenizer_vocab else None)
    flow["model"] = str(path)
    (out / "entropy_flow.json").write_text(json.dumps(flow, indent=1))
    print(table(flow), flush=True)
    k = flow["boundary_layer"]
    where = "none (no layer has a positive mean FFN change)" if k is None else f"{k} (0-based; paper layer {k + 1})"
    print(f"[entropy_flow] {flow['num_tokens']} tokens from {flow['num_samples']} samples, {flow['num_layers']} "
          f"layers, norm={args.norm}; boundary layer: {where}", flush=True)
    import matplotlib

    matplotlib.use("Agg")
    title = f"{Path(path).name}: {flow['num_tokens']} response tokens" + (", final norm applied" if args.norm else "")
    plot_flow(flow, out / "entropy_flow.png", title)
    plot_change(flow, out / "entropy_change.png", title)
    print(f"[entropy_flow] wrote {out / 'entropy_flow.json'}, entropy_flow.png, entropy_change.png", flush=True)
    return flow


if __name__ == "__main__":
    from bupo.cli import run_main

    run_main(main)
