"""Internal-policy lens: what each layer's policy pi^l = softmax(h_l E^T / T) predicts at every position.

    bupo lens --model smollm2 --prompt "What is 7 + 5?" --out runs/lens
    bupo lens --model DIR --prompt TEXT --raw --max-new-tokens 16 --norm both --layers 0-9,20 --out runs/lens

Legend: L decoder layers (0-based l; paper layer = l + 1), T positions, V vocabulary, H hidden, R rows (the chosen
layers, then "final"). Row l at position t is pi^l(. | tokens <= t), a distribution over the token at t + 1; the
"final" row is the full policy softmax(norm(h_{L-1}) E^T / T), whose argmax is "the final prediction".
Per row and position: the top --top tokens with their probabilities, the entropy (nats), and the probability and
rank (1 = top) of the final prediction. --norm off (default) uses the raw residual h_l (the paper's pi^l);
--norm (= --norm on) applies the final norm first (the logit-lens view); --norm both reports the two side by side.

The prompt is rendered with the tokenizer's chat template as one user turn (--chat, default) or encoded as is
(--raw); --max-new-tokens N appends a response sampled from the full policy (built-in engine).
Cost: one forward captures every layer's residual; then, per batch of --batch-rows (layer, position) rows, one
pass over E by the fused entropy kernel (bupo.kernels.linear_entropy) and one chunked pass for the top-k, the
log-sum-exp and the rank. No [T, L, V] tensor is built: one [rows, chunk] logits tile at a time.

Output: a table for --position (default the last) on the terminal, <out>/lens.json (every row and position) and
<out>/lens.png (heatmap rows x positions, colour = entropy or --color prob, top-1 token written in the cells).
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import torch

from bupo import cli
from bupo.evals import context_length, load_model, resolve_model
from bupo.kernels import fp32_logits
from bupo.metrics import plot_text

VIEWS = {"off": ("raw",), "on": ("norm",), "both": ("raw", "norm")}
VIEW_TITLES = {"raw": "raw residual h_l (paper's pi^l)", "norm": "final norm applied: norm(h_l) (logit lens)"}


# --- the lens -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def layer_states(model, ids: list[int], layers: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One forward: ({l: h_l [T, H] raw residual} for `layers`, final-normed h_{L-1} [T, H])."""
    L = model.config.num_hidden_layers
    want = sorted(set(layers) | {L - 1})
    x = torch.tensor([ids], device=model.unembedding.device)  # [1, T]
    got = model.capture(x, layers=want, keys=("layer_out",))
    states = {l: g["layer_out"][0] for l, g in zip(want, got)}
    return {l: states[l] for l in layers}, model.model.norm(states[L - 1])


@torch.no_grad()
def _topk_pass(x: torch.Tensor, E: torch.Tensor, target: torch.Tensor, k: int, inv_t: float, chunk: int):
    """One chunked pass over E for rows x [N, H]: top-k log-probs and ids [N, k], log p(target) [N] and
    rank of target [N] (1 + number of other tokens with a strictly larger logit)."""
    N, V = x.shape[0], E.shape[0]
    f = torch.promote_types(x.dtype, torch.float32)  # fp32 logits (fp64 for fp64 inputs)
    xf = x.to(f)
    zt = (xf * E[target].to(f)).sum(-1) * inv_t  # [N] logit of the target
    m = torch.full((N,), -math.inf, dtype=f, device=x.device)  # running max
    s = torch.zeros(N, dtype=f, device=x.device)  # running sum of exp(z - m)
    greater = torch.zeros(N, dtype=torch.long, device=x.device)
    top_v = torch.empty(N, 0, dtype=f, device=x.device)
    top_i = torch.empty(N, 0, dtype=torch.long, device=x.device)
    rows = torch.arange(N, device=x.device)
    for c0 in range(0, V, chunk):
        z = fp32_logits(x, E[c0 : c0 + chunk]).to(f) * inv_t  # [N, C] fp32 logits tile
        new_m = torch.maximum(m, z.max(-1).values)
        s = s * torch.exp(m - new_m) + torch.exp(z - new_m[:, None]).sum(-1)
        m = new_m
        gt = z > zt[:, None]
        inside = (target >= c0) & (target < c0 + z.shape[1])
        gt[rows[inside], target[inside] - c0] = False  # the target never outranks itself
        greater += gt.sum(-1)
        v, i = z.topk(min(k, z.shape[1]), dim=-1)
        top_v, j = torch.cat([top_v, v], -1).topk(min(k, top_v.shape[1] + v.shape[1]), dim=-1)
        top_i = torch.cat([top_i, i + c0], -1).gather(-1, j)
    lse = m + torch.log(s)  # [N]
    # zt (an elementwise dot) and the tile's matmul can differ in the last bits (~1e-4 on raw logits of ~100): where
    # the target is among the top k, take its logit and rank from the tile, so p(target) equals its top-k p and no
    # p exceeds 1; elsewhere its rank is beyond k by definition.
    hit = top_i == target[:, None]  # [N, k]
    in_top = hit.any(-1)
    z_hit = torch.where(hit, top_v, -math.inf).max(-1).values
    rank = torch.where(in_top, 1 + (top_v > z_hit[:, None]).sum(-1), torch.clamp(greater + 1, min=k + 1))
    logp_t = torch.where(in_top, z_hit, torch.minimum(zt, top_v[:, -1])) - lse
    return top_v - lse[:, None], top_i, logp_t.clamp(max=0.0), rank


@torch.no_grad()
def read_rows(rows: list[torch.Tensor], E: torch.Tensor, *, top: int, temperature: float = 1.0,
              target: torch.Tensor | None = None, batch_rows: int = 2048, chunk: int = 4096) -> dict:
    """Lens statistics of R hidden-state sets [T, H] against E [V, H], as [R, T(, top)] tensors: entropy, top_p,
    top_ids, p_target, rank_target. target [T]: the token whose probability and rank are reported (default: the
    top-1 of the last row). Rows are processed in slices of batch_rows (layer, position) pairs."""
    from bupo.kernels import linear_entropy

    R, T = len(rows), rows[0].shape[0]
    flat = torch.cat(rows)  # [R*T, H]
    if target is None:
        target = _topk_pass(rows[-1], E, torch.zeros(T, dtype=torch.long, device=E.device), 1, 1.0 / temperature,
                            chunk)[1][:, 0]
    tgt = target.repeat(R)  # [R*T]
    parts = []
    for a in range(0, R * T, batch_rows):
        x = flat[a : a + batch_rows]
        ent = linear_entropy(x, E, temperature=temperature)  # one pass over E in the fused kernel
        parts.append((ent, *_topk_pass(x, E, tgt[a : a + batch_rows], top, 1.0 / temperature, chunk)))
    ent, top_lp, top_ids, lp_t, rank = (torch.cat(p) for p in zip(*parts))
    k = top_ids.shape[-1]
    return {"target": target, "entropy": ent.view(R, T), "top_p": top_lp.exp().view(R, T, k),
            "top_ids": top_ids.view(R, T, k), "p_target": lp_t.exp().view(R, T), "rank_target": rank.view(R, T)}


def lens(model, ids: list[int], layers: list[int], *, views: tuple[str, ...] = ("raw",), top: int = 5,
         temperature: float = 1.0, vocab_size: int | None = None, batch_rows: int = 2048, chunk: int = 4096) -> dict:
    """{view: read_rows(...)} for the rows `layers` + final, over the first vocab_size rows of E (the tokenizer's
    real vocabulary, as the samplers use it). The target of every view is the full policy's top-1."""
    E = model.unembedding[: vocab_size or model.config.vocab_size]  # [V, H]
    states, final = layer_states(model, ids, layers)
    norm = model.model.norm
    out, target = {}, None
    for view in views:
        rows = [norm(states[l]) if view == "norm" else states[l] for l in layers] + [final]
        out[view] = read_rows(rows, E, top=top, temperature=temperature, target=target, batch_rows=batch_rows,
                              chunk=chunk)
        target = out[view]["target"]
    return out


# --- input --------------------------------------------------------------------------------------------------------

def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'all', or a comma list of 0-based layers and ranges 'a-b' (inclusive), e.g. '0-4,10,29'."""
    if spec == "all":
        return list(range(num_layers))
    out = []
    for part in spec.split(","):
        a, dash, b = part.strip().partition("-")
        if not a.isdigit() or (dash and not b.isdigit()):
            raise ValueError(f"--layers={spec!r}: use 'all' or 0-based layers and ranges like '0-4,10'")
        lo, hi = int(a), int(b or a)
        if not 0 <= lo <= hi < num_layers:
            raise ValueError(f"--layers={spec!r}: layers must be in [0, {num_layers - 1}] with a <= b in 'a-b'")
        out += range(lo, hi + 1)
    return sorted(set(out))


def prompt_ids(tok, args) -> list[int]:
    if args.raw:
        ids = tok.encode(args.prompt, add_special_tokens=True)
    else:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=args.enable_thinking)
        ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    return ids


def sample_response(model, tok, ids: list[int], args) -> list[int]:
    from bupo.rollout.builtin import BuiltinEngine
    from bupo.rollout.interface import SamplingParams

    params = SamplingParams(n=1, temperature=args.sample_temperature, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, stop_token_ids=tuple(tok.stop_token_ids))
    engine = BuiltinEngine(model, max_batch_size=1, vocab_size=min(tok.vocab_size, model.config.vocab_size))
    return list(engine.generate([ids], params)[0].response_ids)


# --- output -------------------------------------------------------------------------------------------------------

def token_text(tok, i: int) -> str:
    return tok.decode([int(i)], skip_special_tokens=False)


def to_json(res: dict, tok, ids: list[int], n_prompt: int, row_names: list[str]) -> dict:
    """The lens result as lists: per view, [R][T] entropy / p_final / rank_final and [R][T][top] {id, text, p}."""
    texts: dict[int, str] = {}

    def text(i: int) -> str:
        return texts.setdefault(i, token_text(tok, i))

    first = next(iter(res.values()))
    views = {}
    for view, r in res.items():
        top = [[[{"id": i, "text": text(i), "p": p} for i, p in zip(ii, pp)] for ii, pp in zip(ri, rp)]
               for ri, rp in zip(r["top_ids"].tolist(), r["top_p"].tolist())]
        views[view] = {"entropy": r["entropy"].tolist(), "p_final": r["p_target"].tolist(),
                       "rank_final": r["rank_target"].tolist(), "top": top}
    return {"rows": row_names,
            "tokens": [{"pos": t, "id": i, "text": text(i), "part": "prompt" if t < n_prompt else "response"}
                       for t, i in enumerate(ids)],
            "final_prediction": [{"id": i, "text": text(i)} for i in first["target"].tolist()], "views": views}


def _md(text: str) -> str:
    return text.replace("|", "\\|")  # a token such as '<|endoftext|>' must not split a table cell


def table(data: dict, view: str, pos: int) -> str:
    """Markdown table of every row at one position."""
    v, tok = data["views"][view], data["tokens"][pos]
    fin = data["final_prediction"][pos]["text"]
    lines = [f"{VIEW_TITLES[view]}; position {pos}, input {tok['text']!r} -> final prediction {fin!r}", "",
             f"| layer | entropy | p({_md(repr(fin))}) | rank | top tokens |", "|---|---|---|---|---|"]
    for r, name in enumerate(data["rows"]):
        tops = ", ".join(f"{_md(repr(t['text']))} {t['p']:.3f}" for t in v["top"][r][pos])
        lines.append(f"| {name} | {v['entropy'][r][pos]:.3f} | {v['p_final'][r][pos]:.3f} | "
                     f"{v['rank_final'][r][pos]} | {tops} |")
    return "\n".join(lines)


def _label(s: str, width: int = 7) -> str:
    if s and not s.strip(" "):
        s = s.replace(" ", "\u2423")  # a token of spaces only: draw them as open boxes
    s = plot_text(json.dumps(s, ensure_ascii=False)[1:-1])  # escapes newlines; no mathtext
    return s if len(s) <= width else s[: width - 1] + "~"


def plot(data: dict, path: Path, *, color: str, last: int, title: str) -> None:
    """Heatmap per view: rows (layers, final on top) x positions, colour = entropy or p(final prediction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R, T = len(data["rows"]), len(data["tokens"])
    t0 = max(0, T - last) if last else 0
    P = T - t0
    views = list(data["views"])
    key = "entropy" if color == "entropy" else "p_final"
    # entropy: one scale for every panel, up to the largest value shown (ln V would leave most cells dark)
    vmax = max(max(r[t0:]) for v in views for r in data["views"][v][key]) if key == "entropy" else 1.0
    vmax = max(vmax, 1e-6)
    cbar = "entropy (nats)" if key == "entropy" else "p(final prediction)"
    fig, axes = plt.subplots(1, len(views), figsize=(len(views) * (1.2 + 0.5 * P), 1.3 + 0.25 * R), dpi=72,
                             squeeze=False)
    for ax, view in zip(axes[0], views):
        v = data["views"][view]
        grid = [row[t0:] for row in v[key]]
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        if P <= 60 and R <= 64:
            for r in range(R):
                for c in range(P):
                    dark = grid[r][c] < 0.6 * vmax
                    ax.text(c, r, _label(v["top"][r][t0 + c][0]["text"]), ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
        n_prompt = sum(t["part"] == "prompt" for t in data["tokens"])
        if t0 < n_prompt < T:
            ax.axvline(n_prompt - t0 - 0.5, color="white", lw=1.5)  # prompt | sampled response
        ax.set_yticks(range(R), data["rows"], fontsize=7)
        ax.set_xticks(range(P), [_label(t["text"], 10) for t in data["tokens"][t0:]], rotation=90, fontsize=7)
        ax.set_xlabel(f"input token (positions {t0}-{T - 1}); cell: top-1 prediction of the next token")
        ax.set_ylabel("layer l (0-based; paper l + 1)")
        ax.set_title(VIEW_TITLES[view], fontsize=9)
        fig.colorbar(im, ax=ax, label=cbar, fraction=0.03, pad=0.01)
    fig.suptitle(plot_text(title), fontsize=9)
    with warnings.catch_warnings():  # tokens in scripts the default font lacks are drawn as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        fig.savefig(path, pil_kwargs={"optimize": True})
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog=cli.prog("bupo.evals.lens"), description=__doc__.split("\n\n")[0],
                                epilog="Row l at position t is a distribution over the token at t + 1.")
    p.add_argument("--model", required=True, help="HF model folder, or 'smollm2' (the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--out", required=True, help="folder for lens.json and lens.png")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--chat", dest="raw", action="store_false",
                     help="render as one user turn through the chat template (default)")
    fmt.add_argument("--raw", dest="raw", action="store_true", help="encode the prompt text as is")
    p.set_defaults(raw=False)
    p.add_argument("--system", default="", help="--chat: the system message (replaces the template's default "
                   "system turn where it has one, e.g. SmolLM2's)")
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="--chat: passed to the chat template (Qwen3)")
    p.add_argument("--layers", default="all", help="'all' or 0-based layers and ranges, e.g. '0-4,10,29'")
    p.add_argument("--norm", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                   help="apply the final norm to h_l: off (default; the paper's pi^l), on (logit lens), both")
    p.add_argument("--top", type=int, default=5, help="top tokens reported per layer and position")
    p.add_argument("--temperature", type=float, default=1.0, help="T of pi^l = softmax(h_l E^T / T)")
    p.add_argument("--position", type=int, default=-1, help="position of the terminal table (negative: from the end)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="sample a response of up to N tokens (0: prompt only)")
    p.add_argument("--sample-temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--color", choices=("entropy", "prob"), default="entropy",
                   help="heatmap colour: entropy of pi^l, or its probability of the final prediction")
    p.add_argument("--plot-positions", type=int, default=24, help="heatmap shows the last N positions (0: all)")
    p.add_argument("--batch-rows", type=int, default=2048, help="(layer, position) rows per pass over E")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    for name in ("top", "batch_rows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    for name in ("max_new_tokens", "plot_positions"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 0")
    # below 1e-4, 1 / T times a raw logit of ~100 leaves the float32 range
    cli.check_flag("--temperature", args.temperature, 1e-4 <= args.temperature < math.inf,
                   "a finite number >= 1e-4")
    cli.check_flag("--sample-temperature", args.sample_temperature, 0 <= args.sample_temperature < math.inf,
                   "a finite number >= 0 (0: greedy)")
    if args.raw and (args.system or args.enable_thinking is not None):
        flag = "--system" if args.system else "--enable-thinking/--no-enable-thinking"
        raise ValueError(f"{flag} applies to the chat template, which --raw does not use")
    if not args.prompt:
        raise ValueError("--prompt is empty")
    return args


def main(argv: list[str] | None = None) -> dict:
    from bupo.tokenizer import Tokenizer

    args = parse_args(argv)
    path = resolve_model(args.model)
    tok = Tokenizer.from_pretrained(path)
    ids = prompt_ids(tok, args)  # the context check, before any weight is read: prompt + sampled response
    cli.check_context(context_length(path), len(ids), args.max_new_tokens, prompt="tokens of --prompt",
                      new="--max-new-tokens", model=f"--model {args.model}")
    path, model = load_model(args)
    L = model.config.num_hidden_layers
    layers = parse_layers(args.layers, L)
    V = min(tok.vocab_size, model.config.vocab_size)
    if args.top > V:
        raise ValueError(f"--top={args.top}: the vocabulary has {V} tokens")
    n_prompt = len(ids)
    if args.max_new_tokens:
        ids = ids + sample_response(model, tok, ids, args)
    if not -len(ids) <= args.position < len(ids):
        raise ValueError(f"--position={args.position}: the sequence has {len(ids)} tokens ({n_prompt} prompt)")
    pos = args.position % len(ids)
    res = lens(model, ids, layers, views=VIEWS[args.norm], top=args.top, temperature=args.temperature, vocab_size=V,
               batch_rows=args.batch_rows)
    data = {"model": str(path), "prompt": args.prompt, "chat": not args.raw, "num_layers": L, "vocab_size": V,
            "temperature": args.temperature, "top": args.top, "position": pos,
            "indexing": "layers are 0-based (paper layer = l + 1); 'final' is the full policy; row l at position t "
                        "is pi^l over the token at t + 1; rank 1 = top",
            **to_json(res, tok, ids, n_prompt, [str(l) for l in layers] + ["final"])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lens.json").write_text(json.dumps(data, ensure_ascii=False))
    for view in data["views"]:
        print(table(data, view, pos) + "\n", flush=True)
    title = f"{path.name}: {n_prompt} prompt + {len(ids) - n_prompt} response tokens, T={args.temperature}"
    plot(data, out / "lens.png", color=args.color, last=args.plot_positions, title=title)
    print(f"wrote {out / 'lens.json'}, lens.png", flush=True)
    return data


if __name__ == "__main__":
    from bupo.cli import run_main

    run_main(main)
