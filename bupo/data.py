"""Prompts: verl/BuPO parquet rows, a built-in arithmetic task, chat-template rendering and a resumable loader.

Row format (verl): `prompt` = list of chat messages, `reward_model.ground_truth`, `data_source`, optional
`extra_info`. Nested fields stored as strings (JSON or Python literals) are parsed with json, then
`ast.literal_eval`; never `eval`. A `prompt` string that does not start like a serialized message list or message
(`[{"`, `[{'`, `[]`, `{"`, `{'`) is the user's question itself ("[AMC 2023] What is 2+2?" included).
Errors in a file are ValueErrors naming the file, and for a bad value the row and column.
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from bupo.tokenizer import Tokenizer, think_open

_DATA_DIR = Path(__file__).parent / "datasets"
# The BuPO paper's files (MIT), shipped with the package: one train set and four eval sets.
DATASETS: dict[str, Path] = {
    "deepmath-5k": _DATA_DIR / "deepmath-5k.parquet",
    "aime_2024": _DATA_DIR / "aime_2024.parquet",
    "aime_2025": _DATA_DIR / "aime_2025.parquet",
    "amc2023": _DATA_DIR / "amc2023.parquet",
    "math500": _DATA_DIR / "math500.parquet",
}
# The BuPO files' system prompt; the arithmetic task uses it too.
BOXED_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Row:
    prompt: list[dict]  # chat messages [{"role": ..., "content": ...}, ...]
    ground_truth: str | list[str]  # a list holds several acceptable answers
    data_source: str
    extra_info: dict = field(default_factory=dict)
    index: int = 0  # row number in the source file (or generator)


@dataclass
class Prompt:
    ids: list[int]  # rendered, tokenized (possibly left-truncated) prompt
    row: Row
    in_think: bool = False  # the rendered prompt ends inside a think block (its response starts in the reasoning)


# --- parquet


# How a string holding a serialized message list or message starts; any other prompt string is plain text.
_SERIALIZED_CHAT = re.compile(r"""\s*(\[\s*(\]|\{\s*["'])|\{\s*["'])""")


def _literal(value: Any, what: str, strict: bool = True) -> Any:
    """A nested field as stored: a struct/list, or a string holding a JSON or Python literal (an unparseable string
    is an error, or with strict=False kept as it is)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, RecursionError) as e:
        if not strict:
            return value
        raise ValueError(f"{what}: cannot parse {value[:80]!r} as a JSON or Python literal") from e


def _parse_prompt(value: Any, what: str) -> list[dict]:
    if isinstance(value, str) and not _SERIALIZED_CHAT.match(value):
        # A plain question string (some files store the user turn only).
        return [{"role": "user", "content": value}] if value.strip() else []
    value = _literal(value, what)
    if value is None:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what}: expected a list of chat messages or a question string, got "
                         f"{type(value).__name__} {value!r:.80}")
    messages = []
    for m in value:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"{what}: chat message without a role: {m!r:.80}")
        messages.append({k: v for k, v in m.items() if v is not None})
    return messages


def _ground_truth(value: Any) -> str | list[str] | None:
    """String form of a ground truth; integral numbers lose their '.0' ('25.0' -> '25'); strings are kept as is.

    A list of several acceptable answers stays a list of such strings (bupo.reward accepts any of them); its missing
    or empty items are dropped, and a list left with one answer becomes that answer, with none None (row skipped).
    """
    if isinstance(value, (list, tuple, np.ndarray)):
        answers = [a for a in map(_one_ground_truth, value) if a is not None]
        return answers[0] if len(answers) == 1 else answers or None
    return _one_ground_truth(value)


def _one_ground_truth(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None if value is None else str(value)
    if isinstance(value, (float, np.floating)):  # plain positional digits: repr's '1e-05' would read as e - 5
        x = float(value)
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "\\infty" if x > 0 else "-\\infty"
        return str(int(x)) if x.is_integer() else np.format_float_positional(value, trim="-")  # shortest, own dtype
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value).strip()
    return text or None


def _resolve(name_or_path: str | Path, flag: str) -> Path:
    if isinstance(name_or_path, str) and name_or_path in DATASETS:
        return DATASETS[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return path
    names = sorted([*DATASETS, "arithmetic"])  # arithmetic: the built-in task, generated by the callers
    raise ValueError(f"{flag}: unknown dataset {str(name_or_path)!r}: not a file and not one of {names}")


def load_rows(name_or_path: str | Path, flag: str = "dataset") -> tuple[list[Row], dict]:
    """Read a verl/BuPO parquet file (a name from DATASETS or a path); `flag` names the setting in errors.

    Rows with a missing ground truth or an empty prompt are skipped and counted; stats hold rows_total,
    rows_kept, skipped_missing_answer, skipped_empty_prompt and the skipped row numbers (skipped_rows).
    """
    path = _resolve(name_or_path, flag)
    import pyarrow as pa  # here, not at import time: the trainer on the built-in task needs no pyarrow
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: cannot read it as a parquet file ({e})") from None
    cols = set(table.column_names)
    for need in ("prompt", "reward_model"):
        if need not in cols:
            raise ValueError(f"{path}: no {need!r} column (columns: {sorted(cols)})")
    n = table.num_rows
    prompts = table.column("prompt").to_pylist()
    rewards = table.column("reward_model").to_pylist()
    sources = table.column("data_source").to_pylist() if "data_source" in cols else [path.stem] * n
    extras = table.column("extra_info").to_pylist() if "extra_info" in cols else [None] * n
    rows, no_answer, no_prompt = [], [], []
    for i in range(n):
        what = f"{path} row {i}"
        messages = _parse_prompt(prompts[i], f"{what} prompt")
        reward = _literal(rewards[i], f"{what} reward_model") or {}
        gt = _ground_truth(reward.get("ground_truth") if isinstance(reward, dict) else None)
        if gt is None:
            no_answer.append(i)
            continue
        if not any(str(m.get("content") or "").strip() for m in messages):
            no_prompt.append(i)
            continue
        extra = _literal(extras[i], f"{what} extra_info", strict=False) or {}
        extra = extra if isinstance(extra, dict) else {"value": extra}
        rows.append(Row(messages, gt, str(sources[i] or path.stem), extra, i))
    stats = {"rows_total": n, "rows_kept": len(rows), "skipped_missing_answer": len(no_answer),
             "skipped_empty_prompt": len(no_prompt), "skipped_rows": sorted(no_answer + no_prompt)}
    if no_answer or no_prompt:
        warnings.warn(f"{path}: skipped {len(no_answer)} rows without a ground truth (rows {no_answer[:10]}) "
                      f"and {len(no_prompt)} with an empty prompt (rows {no_prompt[:10]})", stacklevel=2)
    return rows, stats


# --- built-in arithmetic task


def _evaluate(terms: list[int], ops: list[str]) -> int:
    # Usual precedence: fold the products first, then add and subtract left to right.
    sums, signs = [terms[0]], []
    for op, t in zip(ops, terms[1:]):
        if op == "*":
            sums[-1] *= t
        else:
            sums.append(t)
            signs.append(op)
    total = sums[0]
    for op, t in zip(signs, sums[1:]):
        total = total + t if op == "+" else total - t
    return total


def arithmetic_rows(n: int, seed: int, *, max_operand: int = 20, num_operands: int = 2, ops: str = "+-*",
                    min_operand: int = 0, system_prompt: str | None = BOXED_SYSTEM_PROMPT,
                    demos: int = 0) -> list[Row]:
    """`n` integer arithmetic questions with boxed answers, a pure function of the arguments.

    Difficulty knobs: operand range [min_operand, max_operand], num_operands terms, ops from "+-*".
    system_prompt None puts the boxed instruction into the user message instead.
    demos > 0 puts that many solved user/assistant turns (the same for every row) before the question: a small
    instruct model that never boxes its answer on its own copies the format, so RL gets a non-zero reward signal.
    """
    if n < 0 or num_operands < 2 or min_operand > max_operand or not ops or set(ops) - set("+-*"):
        raise ValueError(f"arithmetic_rows: need n >= 0, num_operands >= 2, min_operand <= max_operand and ops "
                         f"from '+-*'; got n={n}, num_operands={num_operands}, operands "
                         f"[{min_operand}, {max_operand}], ops={ops!r}")
    rng = random.Random(f"bupo-arithmetic-{seed}")  # local generator: never the global RNG
    demo_rng = random.Random(f"bupo-arithmetic-demos-{seed}")
    shots = []
    for _ in range(demos):
        terms = [demo_rng.randint(min_operand, max_operand) for _ in range(num_operands)]
        signs = [demo_rng.choice(ops) for _ in range(num_operands - 1)]
        expr = " ".join([str(terms[0])] + [f"{op} {t}" for op, t in zip(signs, terms[1:])]).replace("*", "\\times")
        value = _evaluate(terms, signs)
        shots += [{"role": "user", "content": f"What is ${expr}$?"},
                  {"role": "assistant", "content": f"${expr} = {value}$, so the answer is \\boxed{{{value}}}."}]
    rows = []
    for i in range(n):
        terms = [rng.randint(min_operand, max_operand) for _ in range(num_operands)]
        signs = [rng.choice(ops) for _ in range(num_operands - 1)]
        expr = " ".join([str(terms[0])] + [f"{op} {t}" for op, t in zip(signs, terms[1:])])
        expr = expr.replace("*", "\\times")
        question = f"What is ${expr}$?"
        if system_prompt is None:
            messages = [*shots, {"role": "user", "content": f"{question} {BOXED_SYSTEM_PROMPT}"}]
        else:
            messages = [{"role": "system", "content": system_prompt}, *shots, {"role": "user", "content": question}]
        answer = str(_evaluate(terms, signs))
        rows.append(Row(messages, answer, "arithmetic", {"expression": expr, "seed": seed}, i))
    return rows


# --- rendering


def render_prompts(rows: list[Row], tok: Tokenizer, *, max_prompt_length: int, truncation: str = "left",
                   enable_thinking: bool | None = None, template: str | None = None) -> tuple[list[Prompt], dict]:
    """Render rows with the tokenizer's chat template (or `template`) and tokenize them.

    Prompts longer than max_prompt_length keep their last tokens (truncation="left") or are dropped ("drop").
    stats: total, kept, truncated, dropped, max_length (longest prompt before truncation).
    """
    if truncation not in ("left", "drop"):
        raise ValueError(f"truncation={truncation!r}; valid: 'left', 'drop'")
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length={max_prompt_length}; must be >= 1")
    texts = [_render(tok, r, enable_thinking, template) for r in rows]
    all_ids = tok.encode_batch(texts, add_special_tokens=False)
    prompts, truncated, dropped = [], 0, 0
    for row, ids, text in zip(rows, all_ids, texts):
        if len(ids) > max_prompt_length:
            if truncation == "drop":
                dropped += 1
                continue
            ids = ids[-max_prompt_length:]
            truncated += 1
        prompts.append(Prompt(ids, row, think_open(text, row.prompt)))
    stats = {"total": len(rows), "kept": len(prompts), "truncated": truncated, "dropped": dropped,
             "max_length": max((len(i) for i in all_ids), default=0)}
    return prompts, stats


def _render(tok: Tokenizer, row: Row, enable_thinking: bool | None, template: str | None) -> str:
    try:
        return tok.apply_chat_template(row.prompt, add_generation_prompt=True, enable_thinking=enable_thinking,
                                       template=template)
    except jinja2.TemplateError as e:  # the template's raise_exception(...), an undefined name, ...
        which = "the given" if template is not None else tok.template_origin
        raise ValueError(f"{row.data_source} row {row.index}: {which} chat template fails on this prompt "
                         f"({type(e).__name__}: {e})") from None


# --- loader


class PromptLoader:
    """Endless batches of prompts, reshuffled every epoch by (seed, epoch); resumable from state_dict().

    A batch that runs past the end of an epoch is completed from the next epoch's order.
    """

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int) -> None:
        if not prompts:
            raise ValueError("PromptLoader: no prompts")
        if not 1 <= batch_size <= len(prompts):
            raise ValueError(f"batch_size={batch_size}; must be in [1, {len(prompts)}] (the number of prompts)")
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        # A fresh local generator per epoch: the order depends on (seed, epoch) only.
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def next_batch(self) -> list[Prompt]:
        batch = []
        while len(batch) < self.batch_size:
            take = self._order[self.position:self.position + self.batch_size - len(batch)]
            batch += [self.prompts[i] for i in take]
            self.position += len(take)
            if self.position == len(self.prompts):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.prompts):
            raise ValueError(f"PromptLoader state {state} out of range for {len(self.prompts)} prompts")
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)
