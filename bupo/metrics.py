"""Step metrics: metrics.jsonl (one object per step), a one-line console summary, optional wandb / TensorBoard,
and what a run ends with: the reward / entropy curve PNG and a markdown table of the steps."""

from __future__ import annotations

import json
import math
import os
import resource
import uuid
import warnings
from pathlib import Path

import torch

SUMMARY_KEYS = ("phase", "reward_mean", "accuracy", "entropy", "loss", "grad_norm", "clip_frac", "response_len_mean",
                "tokens_per_s")


def peak_mem_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _is_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line.decode()), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def jsonl_rows(path: str | Path, *, cut_partial: bool = False) -> list[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line of a jsonl file ([] when there is none).

    A last line without its newline is what a crash mid-write leaves: it is dropped with a warning (and cut off the
    file when `cut_partial`, before appending to it), unless it is a whole JSON object (only the newline is missing;
    then it is kept, and the newline is added when `cut_partial`). Any other line that is not a JSON object is a
    ValueError naming the file and the line.
    """
    p = Path(path)
    if not p.is_file():
        return []
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and _is_object(data[end:]):
        data += b"\n"
        if cut_partial:
            with open(p, "ab") as f:
                f.write(b"\n")
        end = len(data)
    if end < len(data):
        warnings.warn(f"{p}: dropping a truncated last line ({len(data) - end} bytes) left by an interrupted run")
        if cut_partial:
            with open(p, "r+b") as f:
                f.truncate(end)
    rows = []
    for i, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p} line {i}: not valid JSON ({e}); fix or remove the line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{p} line {i}: not an object (a JSON {type(row).__name__}); fix or remove the line")
        rows.append((i, row))
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a jsonl file (see `jsonl_rows`: a cut last line is dropped, a bad line is an error)."""
    return [row for _, row in jsonl_rows(path)]


class MetricsLogger:
    """Appends step records on rank 0. On resume keeps the records up to the restored step and drops, with a
    warning, those past it (the steps are redone); the file is rewritten atomically, so a crash loses nothing."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, resume_step: int = 0, wandb: bool = False,
                 tensorboard: bool = False, config: dict | None = None, wandb_project: str = "bupo"):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._wandb = self._tb = None
        if not enabled:
            return
        records = read_jsonl(self.path)
        kept = [r for r in records if r.get("step", 0) <= resume_step]
        if len(kept) < len(records):
            later = sorted({r.get("step") for r in records if r.get("step", 0) > resume_step})
            warnings.warn(f"{self.path}: dropping the records of steps {later}: the run resumes after step "
                          f"{resume_step}, so those steps are redone")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        if wandb:
            self._wandb = _wandb_run(Path(out_dir), config, wandb_project)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("trainer.tensorboard=true but tensorboard is not installed; metrics.jsonl only")
            else:  # purge_step: events of the steps that are redone after a resume are hidden from the reader
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step > 0 else None)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(numbers, step=record["step"])
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(out_dir: Path, config: dict | None, project: str):
    """A wandb run for out_dir (None with a warning when wandb is not installed). Its id is kept in
    out_dir/wandb/bupo_run_id, so a resumed trainer run continues the same wandb run. WANDB_MODE=offline writes the
    run under out_dir/wandb/ only."""
    try:
        import wandb as wb
    except ImportError:
        warnings.warn("trainer.wandb=true but wandb is not installed; logging to metrics.jsonl only")
        return None
    id_file = out_dir / "wandb" / "bupo_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")
    return wb.init(project=project, name=out_dir.resolve().name, dir=str(out_dir), config=config, id=run_id,
                   resume="allow")


def summary_line(record: dict) -> str:
    parts = [f"step {record['step']:>4}"]
    for k in SUMMARY_KEYS:
        v = record.get(k)
        if v is None:
            continue
        parts.append(f"{k}={v}" if isinstance(v, str) else f"{k}={v:.4g}")
    return "  ".join(parts)


def final_table(records: list[dict]) -> str:
    """Markdown table of the run: one row per step."""
    cols = ("step", "phase", "reward_mean", "accuracy", "entropy", "response_len_mean", "time_step")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        cells = [r.get(c) for c in cols]
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) and not math.isnan(v) else str(v)
                                       for v in cells) + " |")
    return "\n".join(lines)


def plot_text(text: str) -> str:
    """A string from data (a path, label or token) as matplotlib text: '$' escaped, so it is never read as mathtext
    (a label holding '$\\frac$' would otherwise fail to draw)."""
    return text.replace("$", r"\$")


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Reward and entropy (of the optimized policy) per step; the phase switch is marked. Needs matplotlib."""
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "reward_mean", "mean reward"), (axes[1], "entropy", "entropy (optimized policy)")):
        ax.plot(steps, [r.get(key, float("nan")) for r in records], marker="o", ms=3)
        internal = [r["step"] for r in records if r.get("phase") == "internal"]
        if internal:
            ax.axvspan(min(internal) - 0.5, max(internal) + 0.5, color="tab:orange", alpha=0.15,
                       label="phase one (pi^k)")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel("training step (1-based)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(plot_text(title))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
