"""Compare training runs over seeds: per-step means with t-intervals, window means, group differences.

    bupo compare runs/bupo_s0 runs/bupo_s1 runs/bupo_s2 runs/grpo_s0 runs/grpo_s1 runs/grpo_s2 --out runs/cmp

Each RUN_DIR is an out_dir of `python -m bupo.train` (metrics.jsonl + config.json). Runs are grouped by a label:
by default the config settings that differ between the runs (e.g. `bupo.iterative_steps=30` vs `=0`), ignoring
the seed, the out_dir and the bookkeeping fields in IGNORED_KEYS, which is what tells replicate runs apart;
`--label bupo.iterative_steps,optim.lr` groups by the given keys instead.

Statistics (every interval is a two-sided Student t-interval at --level, default 0.95, the runs being the samples):
- per group and step: mean over the runs that reached the step, +- t_{(1+level)/2, n-1} s / sqrt(n);
- per group and window of --window steps (1-5, 6-10, ...): the same over per-run window means; a run counts in a
  window only if it logged every step of it (so a partial run never biases a window it did not finish);
- difference of each group from the baseline (--baseline, default the first group): difference of the mean window
  means, Welch t-interval (unequal variances, Welch-Satterthwaite degrees of freedom).
With n = 1 run (or n = 1 on either side of a difference) no interval is reported (null), never a made-up one.
Student t quantiles are computed in bupo.evals.tstats (no scipy): the t CDF through the regularized incomplete beta
function (continued fraction), inverted by bisection; exact to ~1e-10, non-integer df included (Welch).

Output: <out>/compare.json (everything above, per step and per window), <out>/compare.md (window tables, also
printed) and <out>/compare.png (mean curves with shaded intervals; the end of BuPO's phase one is marked; note
that the logged entropy is the optimized policy's: pi^k in phase one, the full policy after).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bupo import cli
from bupo.evals.tstats import betainc, t_cdf, t_interval, t_quantile, welch_interval  # noqa: F401 (re-exported)
from bupo.metrics import plot_text

METRICS = ("reward_mean", "accuracy", "entropy", "response_len_mean")
# Config fields that do not change what a run computes step by step; they may differ between replicates.
IGNORED_KEYS = ("trainer.seed", "trainer.out_dir", "trainer.total_steps", "trainer.save_every",
                "trainer.keep_checkpoints", "trainer.threads", "trainer.plot", "trainer.wandb", "trainer.tensorboard",
                "trainer.export", "trainer.device")
TITLES = {"reward_mean": "mean reward", "accuracy": "accuracy", "entropy": "entropy (optimized policy), nats",
          "response_len_mean": "mean response length (tokens)"}


# --- runs ---------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    path: Path
    config: dict  # flattened: "section.field" -> value
    records: dict[int, dict]  # step -> metrics record (the last one of a step logged twice)
    repeated: list[int] = field(default_factory=list)  # steps logged more than once
    label: str = ""

    @property
    def seed(self):
        return self.config.get("trainer.seed")

    @property
    def steps(self) -> list[int]:
        return sorted(self.records)


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)


def read_metrics(path: Path) -> list[dict]:
    """Step records of a metrics.jsonl (bupo.metrics.jsonl_rows: a partially written last line, left by a run that
    is still writing or was killed, is dropped with a warning; another bad line is a ValueError naming it)."""
    from bupo.metrics import jsonl_rows

    out = []
    for i, rec in jsonl_rows(path):
        if isinstance(rec.get("step"), bool) or not isinstance(rec.get("step"), int):
            raise ValueError(f"{path} line {i}: a record without an integer 'step'")
        out.append(rec)
    return out


def _flatten(cfg: dict) -> dict:
    flat = {}
    for section, fields in cfg.items():
        if isinstance(fields, dict):
            flat.update({f"{section}.{k}": v for k, v in fields.items()})
        else:
            flat[section] = fields
    return flat


def load_run(path: str | Path) -> Run:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"run folder {p} does not exist")
    if not p.is_dir():
        raise ValueError(f"{p} is a file, not a run folder (give trainer.out_dir folders of bupo train)")
    metrics, config = p / "metrics.jsonl", p / "config.json"
    if not metrics.is_file():
        raise ValueError(f"{p} has no metrics.jsonl (give trainer.out_dir folders of bupo train)")
    if not config.is_file():
        raise ValueError(f"{p} has no config.json (give trainer.out_dir folders of bupo train)")
    records = read_metrics(metrics)
    if not records:
        raise ValueError(f"{metrics} holds no step records")
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{config}: expected the object of sections python -m bupo.train writes")
    steps = [r["step"] for r in records]
    repeated = sorted(s for s, c in Counter(steps).items() if c > 1)  # linear: runs may log 10^5 steps
    return Run(p, _flatten(cfg), {r["step"]: r for r in records}, repeated=repeated)


def _show(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def label_keys(runs: list[Run], keys: list[str] | None) -> list[str]:
    """The given keys (checked), else the config keys whose values differ between runs, minus IGNORED_KEYS."""
    if keys:
        for k in keys:
            missing = [str(r.path) for r in runs if k not in r.config]
            if missing:
                raise ValueError(f"--label {k}: not a setting in {missing[0]}/config.json "
                                 "(settings look like bupo.iterative_steps, optim.lr)")
        return keys
    all_keys = sorted(set().union(*(r.config for r in runs)) - set(IGNORED_KEYS))
    return [k for k in all_keys if len({_show(r.config.get(k)) for r in runs}) > 1]


def group_runs(runs: list[Run], keys: list[str]) -> list[Group]:
    """Groups in the order their first run was given; label 'k=v, k2=v2' (or 'all runs' with no keys)."""
    groups: dict[str, Group] = {}
    for r in runs:
        r.label = ", ".join(f"{k}={_show(r.config.get(k))}" for k in keys) or "all runs"
        groups.setdefault(r.label, Group(r.label)).runs.append(r)
    return list(groups.values())


# --- statistics ---------------------------------------------------------------------------------------------------

def _value(rec: dict | None, metric: str) -> float | None:
    v = None if rec is None else rec.get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def window_means(run: Run, metric: str, steps: list[int]) -> float | None:
    """Mean of the metric over `steps`; None unless the run has a finite value at every one of them."""
    vals = [_value(run.records.get(s), metric) for s in steps]
    return None if not vals or None in vals else sum(vals) / len(vals)


def windows(steps: list[int], width: int, common: int) -> list[tuple[str, list[int]]]:
    """(name, logged steps) of the windows 1-w, w+1-2w, ... that hold at least one of `steps` (the sorted steps >= 1
    that any run logged; a window no run logged is left out, so one stray step 10^6 adds one window, not 200000),
    then 'all 1-common' (the steps every run reached) unless that is already one of the windows."""
    last = steps[-1]
    by_window: dict[int, list[int]] = {}
    for s in steps:
        by_window.setdefault((s - 1) // width, []).append(s)
    out = [(f"{i * width + 1}-{min(i * width + width, last)}", ws) for i, ws in sorted(by_window.items())]
    upto = [s for s in steps if s <= common]
    if upto and upto not in [ws for _, ws in out]:
        out.append((f"all 1-{common}", upto))
    return out


def group_stats(g: Group, metrics: list[str], wins: list, logged: dict[str, set[int]], level: float) -> dict:
    """Per step and per window statistics of one group. A window of metric m covers the steps of it at which any
    run logged m (`logged[m]`): every step for the trainer's per-step metrics, the validation steps for val/..."""
    steps = sorted(set().union(*(r.records for r in g.runs)))
    per_step = {m: [{"step": s, **t_interval([v for r in g.runs if (v := _value(r.records.get(s), m)) is not None],
                                             level)} for s in steps] for m in metrics}
    per_window = {}
    for m in metrics:
        per_window[m] = []
        for name, ws in wins:
            means = [window_means(r, m, [s for s in ws if s in logged[m]]) for r in g.runs]
            per_window[m].append({"steps": name, "run_means": means,
                                  **t_interval([v for v in means if v is not None], level)})
    phase_one = sorted({s for r in g.runs for s, rec in r.records.items() if rec.get("phase") == "internal"})
    return {"runs": [str(r.path) for r in g.runs], "seeds": [r.seed for r in g.runs],
            "steps_per_run": [len(r.records) for r in g.runs], "phase_one_steps": phase_one,
            "per_step": per_step, "windows": per_window}


def differences(stats: dict, base: str, metrics: list[str], wins: list, level: float) -> list[dict]:
    out = []
    for label, st in stats.items():
        if label == base:
            continue
        for m in metrics:
            for wa, wb in zip(stats[base]["windows"][m], st["windows"][m]):
                a = [v for v in wa["run_means"] if v is not None]
                b = [v for v in wb["run_means"] if v is not None]
                out.append({"group": label, "baseline": base, "metric": m, "steps": wa["steps"],
                            **welch_interval(a, b, level)})
    return out


def _steps_text(steps: list[int]) -> str:
    return f"{steps[:8]}{'...' if len(steps) > 8 else ''}"


def _missing_steps(logged: list[int]) -> tuple[list[int], int]:
    """(the first 9 steps in 1..max(logged) that are not logged, how many are not) for sorted `logged`: found
    between consecutive logged steps, so a stray step of 10^8 costs no set of 10^8 numbers."""
    out, count, prev = [], 0, 0
    for s in logged:
        if s >= 1:
            out.extend(range(prev + 1, min(s, prev + 1 + 9 - len(out))))
            count += s - prev - 1
            prev = s
    return out, count


def data_notes(runs: list[Run], groups: list[Group], metrics: list[str], logged: dict[str, set[int]],
               label: list[str] | None) -> list[str]:
    """What a reader must know about the data: runs of different lengths, steps missing or logged twice, metric
    values that are not finite numbers, and (with --label) groups that mix runs of different settings."""
    notes = []
    if len({r.steps[-1] for r in runs}) > 1:
        notes.append("runs end at different steps: " + "; ".join(
            f"{g.label}: " + ", ".join(f"{r.path.name} {r.steps[-1]}" for r in g.runs) for g in groups)
            + " (last step logged). Per-step statistics use the runs that reached each step (n in compare.json); "
            "a run counts in a window only if it has a value at each of the window's steps.")
    for r in runs:
        gaps, n_gaps = _missing_steps(r.steps)
        if gaps:
            notes.append(f"{r.path}: steps {_steps_text(gaps)} are missing" + (f" ({n_gaps} in all)" if n_gaps > 8
                                                                                  else ""))
        if r.steps[0] < 1:
            notes.append(f"{r.path}: records with step < 1 ({_steps_text([s for s in r.steps if s < 1])}) are in no "
                         "window (training steps count from 1)")
        if r.repeated:
            notes.append(f"{r.path}: steps {_steps_text(r.repeated)} are logged more than once; the last record of "
                         "each is used")
        for m in metrics:
            bad = [s for s in r.steps if m in r.records[s] and _value(r.records[s], m) is None]
            if bad:
                notes.append(f"{r.path}: {m} is not a finite number at steps {_steps_text(bad)}; those steps count "
                             "as missing")
            absent = [s for s in sorted(logged[m]) if s in r.records and m not in r.records[s]]
            if absent:
                notes.append(f"{r.path}: {m} is not logged at steps {_steps_text(absent)} where other runs have it")
    for g in groups:
        seeds = [r.seed for r in g.runs]
        if len(set(map(_show, seeds))) < len(seeds):
            notes.append(f"group {g.label!r} has runs with the same seed ({', '.join(map(_show, seeds))}): they are "
                         "not independent replicates")
    if label:
        for g in groups:
            differ = [k for k in sorted(set().union(*(r.config for r in g.runs)) - set(IGNORED_KEYS) - set(label))
                      if len({_show(r.config.get(k)) for r in g.runs}) > 1]
            if differ:
                notes.append(f"group {g.label!r} mixes runs whose settings differ in {', '.join(differ)} (--label "
                             "groups by the given keys only)")
    return notes


# --- report -------------------------------------------------------------------------------------------------------

def _fmt(x: float | None, metric: str, signed: bool = False) -> str:
    if x is None:
        return "-"
    digits = 1 if metric == "response_len_mean" else 3
    if x != 0 and abs(x) < 0.5 * 10**-digits:  # fixed digits would show 0 (e.g. logp_mismatch): 3 significant ones
        return f"{x:+.3g}" if signed else f"{x:.3g}"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _cell(st: dict, metric: str, signed: bool = False) -> str:
    key = "diff" if signed else "mean"
    s = _fmt(st[key], metric, signed)
    if st[key] is not None and st["lo"] is not None:
        s += f" [{_fmt(st['lo'], metric, signed)}, {_fmt(st['hi'], metric, signed)}]"
    elif st[key] is not None:
        s += " (no interval: n=1)" if signed else ""
    return s + ("" if signed else f" (n={st['n']})")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _code(label: str) -> str:
    """A label as a markdown code span inside a table: '|' escaped (it would split the cell); a label holding a
    backtick is fenced with two."""
    fence = "``" if "`" in label else "`"
    pad = " " if label.startswith("`") or label.endswith("`") else ""
    return f"{fence}{pad}{label.replace('|', chr(92) + '|')}{pad}{fence}"


def markdown(result: dict) -> str:
    labels, base, lvl = list(result["groups"]), result["baseline"], f"{100 * result['level']:g}"
    n_runs = len(result["runs"])
    diff = (f"; differences: group - {_code(base)} [{lvl}% Welch t-interval on per-run window means]"
            if len(labels) > 1 else "")
    out = [f"# Run comparison: {_plural(n_runs, 'run')} in {_plural(len(labels), 'group')}", "",
           f"Cells: mean over runs [{lvl}% Student t-interval] (n runs){diff}. Windows of {result['window']} steps.",
           ""]
    for lab, st in result["groups"].items():
        p1 = st["phase_one_steps"]
        phase = f", phase one steps {p1[0]}-{p1[-1]}" if p1 else ""
        out.append(f"- {_code(lab)}: {_plural(len(st['runs']), 'run')} (seeds {', '.join(map(_show, st['seeds']))})"
                   f"{phase}")
    out += [f"- note: {n}" for n in result["notes"]]
    diffs = {(d["group"], d["metric"], d["steps"]): d for d in result["differences"]}
    for m in result["metrics"]:
        others = [lab for lab in labels if lab != base]
        head = ["steps", *[_code(lab) for lab in labels], *[f"{_code(lab)} - {_code(base)}" for lab in others]]
        out += ["", f"## {m}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, w in enumerate(result["groups"][base]["windows"][m]):
            cells = [w["steps"], *[_cell(result["groups"][lab]["windows"][m][i], m) for lab in labels],
                     *[_cell(diffs[(lab, m, w["steps"])], m, signed=True) for lab in others]]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = result["metrics"]
    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows), dpi=100, squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for i, (lab, st) in enumerate(result["groups"].items()):
            color = f"C{i}"
            rows = [r for r in st["per_step"][m] if r["mean"] is not None]
            steps = [r["step"] for r in rows]
            ax.plot(steps, [r["mean"] for r in rows], color=color, lw=1.4,
                    label=plot_text(f"{lab} (n={len(st['runs'])})"))
            band = [r for r in rows if r["lo"] is not None]
            if band:
                ax.fill_between([r["step"] for r in band], [r["lo"] for r in band], [r["hi"] for r in band],
                                color=color, alpha=0.2, lw=0)
        ends: dict[int, list[str]] = {}  # groups that end phase one after the same step share one line
        for lab, st in result["groups"].items():
            if st["phase_one_steps"]:
                ends.setdefault(st["phase_one_steps"][-1], []).append(lab)
        for j, (end, labs) in enumerate(ends.items()):
            names = "all BuPO groups" if len(ends) == 1 else ", ".join(labs)
            ax.axvline(end + 0.5, color=f"{0.35 + 0.2 * (j % 2):.2f}", ls=("--", ":")[j % 2], lw=0.9,
                       label=plot_text(f"phase one ends after step {end} ({names})"))
        ax.set_title(TITLES.get(m, m), fontsize=10)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    lvl = f"{100 * result['level']:g}"
    fig.suptitle(f"mean over seeds, shaded: {lvl}% t-interval; dashed: end of phase one (pi^k)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------------------------

def compare(run_dirs: list[str], *, label: list[str] | None = None, baseline: str | None = None, window: int = 5,
            metrics: tuple[str, ...] | list[str] = METRICS, level: float = 0.95) -> dict:
    """The whole comparison as a JSON-ready dict (see the module docstring)."""
    if not 0.5 <= level <= 0.9999:
        raise ValueError(f"--level={level}: must be in [0.5, 0.9999]")
    runs = [load_run(d) for d in run_dirs]
    seen: dict[Path, str] = {}
    for d, r in zip(run_dirs, runs):
        if r.path.resolve() in seen:
            raise ValueError(f"run folder {d} is given twice (also as {seen[r.path.resolve()]})")
        seen[r.path.resolve()] = str(d)
    metrics = list(metrics)
    logged = {m: {s for r in runs for s in r.steps if _value(r.records[s], m) is not None} for m in metrics}
    for m in metrics:
        if not any(m in rec for r in runs for rec in r.records.values()):
            first = runs[0].records[runs[0].steps[0]]
            raise ValueError(f"--metrics {m}: no record of any run has it; keys: {', '.join(sorted(first))}")
        if not logged[m]:
            raise ValueError(f"--metrics {m}: no run has a finite number for it (it is not a numeric metric)")
    keys = label_keys(runs, label)
    groups = group_runs(runs, keys)
    labels = [g.label for g in groups]
    base = labels[0] if baseline is None else baseline
    if base not in labels:
        raise ValueError(f"--baseline {base!r} is not a group; groups: {', '.join(map(repr, labels))}")
    steps = sorted({s for r in runs for s in r.steps if s >= 1})
    if not steps:
        raise ValueError("no run has a record with step >= 1 (training steps count from 1)")
    wins = windows(steps, window, min(r.steps[-1] for r in runs))
    stats = {g.label: group_stats(g, metrics, wins, logged, level) for g in groups}
    notes = data_notes(runs, groups, metrics, logged, label)
    for n in notes:
        print(f"warning: {n}", file=sys.stderr, flush=True)
    return {"runs": [{"dir": str(r.path), "label": r.label, "seed": r.seed, "num_steps": len(r.records),
                      "last_step": r.steps[-1]} for r in runs],
            "label_keys": keys, "baseline": base, "window": window, "level": level, "metrics": metrics,
            "interval": {"per_step_and_window": "Student t-interval over runs: mean +- t_{(1+level)/2, n-1} sd/sqrt(n);"
                                                " null for n=1",
                         "difference": "Welch t-interval on per-run window means (Welch-Satterthwaite df); null "
                                       "unless both groups have n>=2"},
            "notes": notes, "groups": stats, "differences": differences(stats, base, metrics, wins, level)}


def _finite(x):
    """The result with non-finite floats (a mean of values near 1e308 overflows) as null: standard JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog=cli.prog("bupo.evals.compare"), description=__doc__.split("\n\n")[0],
                                epilog="Intervals: see the module docstring (Student t over seeds; Welch for "
                                       "differences; none for n=1).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="trainer.out_dir of a bupo train run")
    p.add_argument("--out", required=True, help="folder for compare.json, compare.md, compare.png")
    p.add_argument("--label", default="", help="comma-separated config keys to group by (e.g. bupo.iterative_steps); "
                                               "default: the settings that differ between runs, except the seed, "
                                               "out_dir and bookkeeping fields")
    p.add_argument("--baseline", help="group label the others are compared with (default: the first group)")
    p.add_argument("--window", type=int, default=5, help="steps per window mean")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma-separated metrics.jsonl keys")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals, 0.5 to 0.9999")
    args = p.parse_args(argv)
    if args.window < 1:
        raise ValueError(f"--window={args.window}: must be >= 1")
    if not 0.5 <= args.level <= 0.9999:  # (1 + level) / 2 must stay inside (0.5, 1) in floating point
        raise ValueError(f"--level={args.level}: must be in [0.5, 0.9999]")
    args.metrics = _names(args.metrics, "--metrics")
    args.label = _names(args.label, "--label") if args.label else None
    return args


def _names(text: str, flag: str) -> list[str]:
    """A comma-separated list of names: spaces around names ignored, each name once."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ValueError(f"{flag}={text!r} names nothing")
    return names


def main(argv: list[str] | None = None) -> dict:
    from bupo.cli import check_out_dir

    args = parse_args(argv)
    check_out_dir(args.out, "--out")
    result = compare(args.runs, label=args.label, baseline=args.baseline,
                     window=args.window, metrics=args.metrics, level=args.level)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(_finite(result), indent=1, allow_nan=False))
    md = markdown(result)
    (out / "compare.md").write_text(md)
    plot(result, out / "compare.png")
    print(md, flush=True)
    print(f"wrote {out / 'compare.json'}, compare.md, compare.png", flush=True)
    return result


if __name__ == "__main__":
    from bupo.cli import run_main

    run_main(main)
