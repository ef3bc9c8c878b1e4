"""The GPU check's report: OUT_DIR/report.json and OUT_DIR/report.md from what launch/gpu_check.sh left there.

    python -m bupo.gpu_report OUT_DIR --mode full|quick --started ISO_DATE --command "bash launch/gpu_check.sh ..."

Reads, per part: parts/<part>.run (`rc=.. seconds=.. limit=.. started=..`, written by the launcher after coreutils
`timeout` returned), parts/<part>.cmd (the launcher's exact command line), parts/<part>.json (the part's own
result, see bupo/gpu_check.py) and logs/<part>.log. A part's status: `timeout` when `timeout` ended it (exit code
124, or 137 after the follow-up KILL), `failed` for any other non-zero exit or a missing or unfinished result file,
else the status the part wrote (passed / skipped / failed, or timeout when one of its commands used up the part's
budget, with its reason); `not run` when the launcher never reached it. Standard library only, so the report is
written even where torch does not import.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from bupo import cli

PARTS = [("env", "Environment: GPU, driver, torch, triton, packages"),
         ("gpu_tests", 'The gpu-marked tests without vLLM (pytest -m "gpu and not vllm")'),
         ("kernel_bench", "Fused log-prob/entropy kernel vs materializing torch and liger-kernel (bupo.kernels.bench)"),
         ("bench_step", "Phase-one vs full update step (bupo.bench.step)"),
         ("e2e", "Trainer end to end: 2 phase-one steps, DCP checkpoint, resume in a new process, export"),
         ("report", "This report")]
TAIL_LINES, TAIL_CHARS = 40, 4000
BENCH_COLS = ["provider", "mode", "status", "median_ms", "p20_ms", "p80_ms", "tflops_eq", "act_mb", "time_vs_naive",
              "mem_vs_naive"]
STEP_COLS = ["step", "phase", "time_step", "time_rollout", "time_update", "tokens_per_s", "peak_mem_gb", "entropy",
             "reward_mean"]


# --- collecting ----------------------------------------------------------------------------------------------------

def read_run(path: Path) -> dict | None:
    if not path.is_file():
        return None
    fields = dict(kv.split("=", 1) for kv in path.read_text().split())
    return {"rc": int(fields["rc"]), "seconds": float(fields["seconds"]), "timeout_s": int(fields["limit"]),
            "started": fields.get("started", "")}


def log_tail(path: Path) -> str:
    if not path.is_file():
        return ""
    text = path.read_bytes().decode(errors="replace").rstrip("\n")  # not read_text: it turns \r into \n
    lines = [x.rstrip("\r").split("\r")[-1] for x in text.split("\n")]  # a progress bar's line: its last frame
    return "\n".join(lines[-TAIL_LINES:])[-TAIL_CHARS:]


def part_status(run: dict | None, res: dict | None) -> tuple[str, str]:
    if run is None:
        return "not run", "the launcher did not reach this part"
    if run["rc"] in (124, 137):
        return "timeout", f"ended by its {run['timeout_s']} s timeout" + (f" ({res['reason']})" if res and
                                                                          res.get("reason") else "")
    if res is None or res["status"] == "running":
        return "failed", f"exit code {run['rc']} before the part wrote its result (see its log)"
    if run["rc"] != 0 and res["status"] not in ("failed", "timeout"):
        return "failed", f"exit code {run['rc']} after the part reported {res['status']}"
    return res["status"], res["reason"]


def collect(out: Path, name: str, title: str) -> dict:
    parts = out / "parts"
    run = read_run(parts / f"{name}.run")
    res = json.loads((parts / f"{name}.json").read_text()) if (parts / f"{name}.json").is_file() else None
    status, reason = part_status(run, res)
    cmd = (parts / f"{name}.cmd").read_text().strip() if (parts / f"{name}.cmd").is_file() else ""
    return {"name": name, "title": title, "status": status, "reason": reason, "command": cmd,
            "seconds": run and run["seconds"], "timeout_s": run and run["timeout_s"], "exit_code": run and run["rc"],
            "started": run and run["started"], "notes": (res or {}).get("notes", []),
            "facts": (res or {}).get("facts", {}), "runs": (res or {}).get("runs", []),
            "log_tail": log_tail(out / "logs" / f"{name}.log")}


def build(out: Path, args: argparse.Namespace, t0: float) -> dict:
    parts = [collect(out, name, title) for name, title in PARTS[:-1]]
    cmd = out / "parts" / "report.cmd"
    parts.append({"name": "report", "title": PARTS[-1][1], "status": "passed", "reason": "",
                  "command": cmd.read_text().strip() if cmd.is_file() else "",
                  "seconds": round(time.monotonic() - t0, 2), "timeout_s": args.timeout, "exit_code": 0,
                  "started": args.now, "notes": [], "facts": {}, "runs": [], "log_tail": ""})
    summary = {s: sum(p["status"] == s for p in parts) for s in ("passed", "skipped", "failed", "timeout", "not run")}
    return {"check": "BuPO GPU check (launch/gpu_check.sh)", "mode": args.mode, "command": args.command,
            "pythonpath": os.environ.get("PYTHONPATH", ""),
            "started": args.started, "finished": now_iso(), "out_dir": str(out), "summary": summary,
            "ok": summary["failed"] + summary["timeout"] + summary["not run"] == 0,
            "seconds": round(sum(p["seconds"] or 0 for p in parts), 1),
            "budget_s": sum(p["timeout_s"] or 0 for p in parts), "environment": parts[0]["facts"], "parts": parts}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- markdown -------------------------------------------------------------------------------------------------------

def cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict], cols: list[str]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
            *("| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows)]


def runs_md(p: dict) -> list[str]:
    lines = []
    for r in p["runs"]:
        state = "timed out" if r["timed_out"] else f"exit code {r['rc']}"
        lines += ["", f"`{r['command']}`", "", f"{state}, {r['seconds']} s (limit {r['timeout_s']} s)"]
        res = r.get("result") or {}
        if p["name"] == "kernel_bench" and res.get("results"):
            lines += ["", f"N={res['N']} H={res['H']} V={res['V']} {res['dtype']} on {res['device']} "
                          f"(torch {res['torch']}, triton {res['triton']}, commit {res['commit']})", ""]
            lines += table(res["results"], BENCH_COLS)
        elif res:
            lines += ["", *table([res], list(res))]
        elif r.get("tail"):
            lines += ["", "```", *r["tail"], "```"]
    return lines


def facts_md(p: dict) -> list[str]:
    facts = dict(p["facts"])
    lines = []
    if "steps" in facts:
        lines += ["", "Metrics of the three steps (metrics.jsonl; steps 1-2 by the first command, 3 by the second):",
                  "", *table(facts.pop("steps"), STEP_COLS)]
    if facts:
        lines += ["", *table([{"fact": k, "value": json.dumps(v) if isinstance(v, (dict, list)) else v}
                              for k, v in facts.items()], ["fact", "value"])]
    return lines


def part_md(i: int, p: dict) -> list[str]:
    lines = [f"## {i}. {p['name']}: {p['status']}", "", p["title"] + ".", "",
             f"Launcher command: `{p['command']}`" if p["command"] else "Launcher command: (none)",
             f"Started {p['started']}; {p['seconds']} s of its {p['timeout_s']} s timeout; exit code {p['exit_code']}."]
    lines += [f"Reason: {p['reason']}"] if p["reason"] else []
    lines += [f"Note: {n}" for n in p["notes"]]
    lines += facts_md(p) + runs_md(p)
    if p["log_tail"]:
        lines += ["", f"Log tail (logs/{p['name']}.log):", "", "```", p["log_tail"], "```"]
    return lines + [""]


def markdown(rep: dict) -> str:
    s = rep["summary"]
    lines = [f"# BuPO GPU check ({rep['mode']})", "",
             f"Started {rep['started']}, finished {rep['finished']} (UTC). Command: `{rep['command']}`. Each part "
             f"ran from the repository root with PYTHONPATH={rep['pythonpath']}, under coreutils `timeout`; the "
             "commands inside a part are quoted as they ran.", "",
             f"**{'OK' if rep['ok'] else 'NOT OK'}**: {s['passed']} passed, {s['skipped']} skipped, {s['failed']} "
             f"failed, {s['timeout']} timed out, {s['not run']} not run; {rep['seconds']} s in all, the part timeouts "
             f"sum to {rep['budget_s']} s.",
             "", *table([{"#": i, **p} for i, p in enumerate(rep["parts"], 1)],
                        ["#", "name", "status", "seconds", "timeout_s", "reason"]), ""]
    for i, p in enumerate(rep["parts"], 1):
        lines += part_md(i, p)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    p = cli.ArgumentParser(prog=cli.prog("bupo.gpu_report"), description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--mode", choices=["full", "quick"], required=True)
    p.add_argument("--started", required=True, help="when the check started (ISO 8601)")
    p.add_argument("--command", required=True, help="the check's command line")
    p.add_argument("--timeout", type=int, default=0, help="this step's own timeout (for the report's row)")
    args = p.parse_args(argv)
    args.now = now_iso()
    rep = build(args.out.resolve(), args, t0)
    (args.out / "report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    (args.out / "report.md").write_text(markdown(rep))
    print(f"[gpu_check] {args.out / 'report.md'}: {rep['summary']}")
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
