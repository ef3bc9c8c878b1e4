"""Math reward: the last \\boxed{...} of a response checked against the ground truth, with a hard time limit.

Where the answer is read (`answer_text`). A thinking response is answered after its reasoning: when the response
holds a `</think>`, its answer is read only after the last one. A think block that never closes -- the response's last
`<think>` has no `</think>` after it, or (`in_think`) its prompt opened the block, as Qwen3-*-Thinking-2507's
generation prompt does, and the response never closes it -- means the response was cut off while reasoning: it has
no answer (score 0, reason "unclosed_think"), whatever it boxed inside the reasoning. So `<think> ... so maybe
\\boxed{5} ...` cut off by max_new_tokens scores 0 against 5 (a tentative box in unfinished reasoning is not an
answer). A response without think tags (and not in_think) is read whole, as before. The tags are read in the decoded
text: a tokenizer that marks `<think>` as a special token must be decoded with its special tokens kept.

score() decides in four steps:
1. a think block that never closes -> unclosed_think; no box after the reasoning (or an empty one) -> no_answer;
2. answer and ground truth are brought to one canonical form: ordinal suffixes and thousands separators dropped,
   other commas between digits made list commas (rules below);
3. fast path in-process: equal normalized strings -> correct; two plain numbers -> the number rules below ("025" ==
   "25"); a text ground truth ("Yes", "\\text{Evelyn}") -> case-insensitive string match only (math-verify would
   read "Yes" as the product Y*e*s and accept "sey");
4. otherwise math-verify (parse + verify) in a worker process, under a hard wall-clock limit, with its two value
   comparisons replaced by the number rules.

Ground truth: a string, a number, a bool, or a list of acceptable answers (a verl row may hold several). With a list
the answer is correct when it matches any of them; otherwise the reason is "wrong" if any comparison was made, else
"timeout", else "parse_error"; the time limit covers the whole list. Any other type (None, dict, a list inside the
list) is a TypeError naming ground_truth; an empty string or list, or NaN, is a ValueError. A float is read as its
shortest repr in plain notation (0.3 -> "0.3", 1e-05 -> "0.00001", 25.0 -> "25"), so a non-integral one is a decimal
ground truth (below); +-inf is +-\\infty; a bool is the text answer "True"/"False".

Numbers. math-verify compares with a fixed float tolerance: it rounds floats to 6 decimals and chops differences
below ~1e-15 to zero, so 2^{-61} equalled 2^{-60} and e^{-100} equalled e^{-101}. Instead:
- exact values (integers, fractions, powers, factorials, radicals, pi, e, ...) are equal only when their difference
  is exactly zero (sympy: is_zero, then simplify, then equals): 10^{20} != 10^{20}+1, 100! != 100!+1,
  \\frac{1}{10^9} != 0, but \\frac{\\sqrt2}{2} == \\frac{1}{\\sqrt2}. A constant difference that sympy can neither
  prove zero nor show nonzero at its highest evaluation precision (relative to the terms, ~100 digits) counts as
  zero: \\arctan 1 + \\arctan 2 + \\arctan 3 == \\pi;
- a decimal means the value it is written as: 0.4 == \\frac25 and 540.0 == 540, but against an exact ground truth
  0.3333 != \\frac13, 0.333333 != \\frac13 and 6.2832 != 2\\pi (a question with an exact answer wants it exactly,
  as in the MATH benchmark's own grading; math-verify accepted 6-decimal roundings);
- a ground truth that is a decimal number (0.0466, -2.5, 5.10\\%, or one item of a tuple) is a rounding -- the
  shipped deepmath decimal answers are asked "to four decimal places", "to the nearest tenth" -- so an answer is
  correct when it rounds to it: within half a unit of its last written digit, ends included. 0.0466 accepts 0.04663,
  0.04655 and \\frac{233}{5000}, not 0.047 or 0.0467; 3.14 accepts \\pi; 0.5 accepts 0.54. A decimal inside a larger
  expression (0.5x) is exact;
- a percentage X\\% equals X/100 and, as in math-verify, the bare X (5\\% == 0.05 == 5).

Commas between digits. A comma is never a decimal point (the shipped files use points; "2,6" and "-1,2" there are
lists), so 3,5 is the list {3, 5}, not 3.5. A thousands separator is
- an explicit LaTeX one between groups of exactly three digits: 1{,}000, 10,\\!080, 1\\,000, 1\\ 000 or a plain space
  (LaTeX ignores spaces in math: 1 000), anywhere;
- a plain comma only in a number grouped as 1-3 digits not starting with 0, then groups of exactly three (1,000;
  1,000,000; 58,500; -1,234.5), and not inside (), [] or \\{\\}, where commas separate items ((2,100) is a pair).
Every other comma between digits separates list items: 0,500 is {0, 500} (neither 500 nor 0.5), 12,34 is {12, 34},
1,2 == 1, 2; a space after a comma (1, 000) makes it a list comma too.

Ordinals. A number followed by its own English suffix is that number, in the usual forms: 12^{\\text{th}},
21^\\text{st}, 13\\textsuperscript{th}, 22\\mathrm{nd} anywhere; 1st, 2nd, 3^{rd}, 12^{th} only when the answer is
ordinals and numbers alone (in "a+2nd" the letters may be variables). A suffix not the number's own (2^{th}) is kept.

Why worker processes: math-verify's own timeout uses SIGALRM, which only works in the main thread, and sympy can
hang in C code that no signal interrupts (`9^{9^{9^9}}`). Each worker is a small `python -c` process that loads this
file alone by its path (stdlib imports only; not the bupo package, which may pull torch), imports math-verify and
runs with math-verify's signal timeouts off; the parent waits on its pipe with a deadline and kills the process when
the deadline passes, so the limit holds from any thread. The pool is created lazily, reused, grows up to the number
of concurrent callers and shuts down at exit.
"""

from __future__ import annotations

import atexit
import json
import math
import numbers
import os
import re
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

REASONS = ("correct", "wrong", "no_answer", "parse_error", "timeout", "unclosed_think")
# A list ground truth reports the first of these that any of its answers got.
_MERGE_ORDER = ("correct", "wrong", "timeout", "parse_error", "no_answer", "unclosed_think")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Time a fresh worker may take to import math-verify and answer a warm-up parse; not part of an answer's limit.
STARTUP_TIMEOUT_S = 120.0
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Address-space limit of a worker process (bytes); exceeding it scores the answer "timeout".
MEMORY_LIMIT = 4 << 30


@dataclass(frozen=True)
class RewardResult:
    score: float  # 1.0 or 0.0
    reason: str  # one of REASONS


# --- extraction


_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced(text: str, start: int) -> str | None:
    """Contents of the brace group opening at text[start] == "{", or None when it never closes."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} (nested braces), or of a "\\boxed 5" form; else None."""
    last = None
    for last in _BOX.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end():]
    j = len(rest) - len(rest.lstrip(" \t"))
    if rest[j:j + 1] == "{":
        inner = _braced(rest, j)
        return None if inner is None else inner.strip()
    token = re.match(r"\s*([^\s$]*)", rest).group(1).rstrip(".,;")
    return token or None


def answer_text(response: str, in_think: bool = False) -> str | None:
    """The part of `response` its answer is read from (module docstring): after the last `</think>` when it holds
    one, None when a think block is open at its end (its last `<think>` never closes, or `in_think`: its prompt
    opened the block and it holds no `</think>`), else the whole response."""
    close = response.rfind(THINK_CLOSE)
    if response.rfind(THINK_OPEN) > close or (in_think and close < 0):
        return None
    return response if close < 0 else response[close + len(THINK_CLOSE):]


# --- ground truths


def _gold_text(value: object, name: str) -> str:
    """One acceptable answer as a string; numbers in plain decimal notation (1e-05 -> "0.00001")."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{name}={value!r} is empty; need an answer")
        return value.strip()
    if isinstance(value, bool):
        return str(value)  # "True" / "False": text answers
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Rational):
        return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"
    if isinstance(value, numbers.Real):
        x = float(value)
        if math.isnan(x):
            raise ValueError(f"{name} is NaN; need an answer")
        if math.isinf(x):
            return "\\infty" if x > 0 else "-\\infty"
        return str(int(x)) if x.is_integer() else format(Decimal(repr(x)), "f")
    raise TypeError(f"{name} is a {type(value).__name__} ({value!r:.80}); need a str, a number, a bool or a list "
                    "of them (the acceptable answers)")


def _golds(value: object, name: str = "ground_truth") -> list[str]:
    """The acceptable answers of a ground truth (see the module docstring), as strings."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} is an empty list; need at least one acceptable answer")
        return [_gold_text(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return [_gold_text(value, name)]


def _merge(reasons: list[str]) -> str:
    return min(reasons, key=_MERGE_ORDER.index)


# --- canonical form: ordinals and commas


_SUFFIX = r"(?:st|nd|rd|th)"
_TEXT_SUFFIX = rf"\\(?:text|textrm|textup|textnormal|mathrm|mbox|textsuperscript)\s*\{{\s*{_SUFFIX}\s*\}}"
_NUMBER_THEN = r"(?<![\d.])(\d+)\s*(?:\{\})?\s*(?:\^\s*)?"  # 12, 12^, 12{}^
_TEXT_ORDINAL = re.compile(rf"{_NUMBER_THEN}(?:\{{\s*{_TEXT_SUFFIX}\s*\}}|{_TEXT_SUFFIX})")
_TEXT_NAME = re.compile(r"\\(?:text|textrm|textup|textnormal|mathrm|mbox)(?![A-Za-z])")
_PLAIN_ORDINAL = re.compile(rf"{_NUMBER_THEN}(?:\{{\s*{_SUFFIX}\s*\}}|{_SUFFIX}(?![A-Za-z]))")
# Digit groups joined by separators: explicit thousands separators, plain commas, spaces (never after ^ or _).
_DIGIT_RUN = re.compile(r"(?<![\d.^_])\d+(?:(?:\{,\}|,\\!\s*|\\,\s*|\\ \s*|,|\s+)\d+)+")
_OPEN, _CLOSE = ("(", "[", "\\{"), (")", "]", "\\}")


def _suffix(n: int) -> str:
    """English ordinal suffix of n: 1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, 111th."""
    n %= 100
    return "th" if n in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def _drop_ordinal(m: re.Match) -> str:
    digits = m.group(1)
    suffix = re.search(r"(st|nd|rd|th)[\s}]*$", m.group()).group(1)
    return digits if suffix == _suffix(int(digits[-2:])) else m.group()


def _bracket_depth(s: str, end: int) -> int:
    head = s[:end]
    return sum(head.count(c) for c in _OPEN) - sum(head.count(c) for c in _CLOSE)


def _digit_run(s: str, m: re.Match) -> str:
    """A run of digit groups as one number when grouped in thousands (module docstring), else with list commas."""
    run = m.group()
    groups, seps = re.findall(r"\d+", run), re.findall(r"\D+", run)
    grouped = re.fullmatch(r"[1-9]\d{0,2}", groups[0]) and all(len(g) == 3 for g in groups[1:])
    plain_comma = "," in seps
    if grouped and (not plain_comma or _bracket_depth(s, m.start()) == 0):
        return "".join(groups)
    return re.sub(r"(?<=\d),(?=\d)", ", ", run)


def _drop_ordinals(s: str) -> str:
    s = _TEXT_ORDINAL.sub(_drop_ordinal, s)  # 12^{\text{th}}: a suffix in text is never algebra
    plain = _PLAIN_ORDINAL.sub(_drop_ordinal, s)
    # 2nd or 3^{rd} can be algebra (2*n*d, 3^{r*d}): dropped only from an answer that is ordinals and numbers alone.
    return s if re.search(r"[A-Za-z]", _TEXT_NAME.sub("", plain)) else plain


def _canonical(s: str) -> str:
    s = _drop_ordinals(s)
    return _DIGIT_RUN.sub(lambda m: _digit_run(s, m), s)


# --- fast path


_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\$", "^{\\circ}", "^\\circ", "\\displaystyle")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")


def _normalize(s: str) -> str:
    s = s.strip().strip("$")
    s = _TEXT_CMD.sub(r"\1", s)
    for d in _DROP:
        s = s.replace(d, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\ ", "")
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", r"\1{}", s)  # "\pi r" must not become "\pir"
    return re.sub(r"\s+", "", s).rstrip(".")


def _number(s: str) -> Fraction | None:
    # Through Decimal: int(str) refuses more than 4300 digits, and the answer is untrusted.
    return Fraction(Decimal(s)) if _NUMBER.fullmatch(s) else None


def _half_unit(s: str) -> Fraction:
    """Half a unit in the last written decimal place of the number s ("0.0466" -> 0.00005); 0 for an integer."""
    _, dot, decimals = s.partition(".")
    return Fraction(1, 2 * 10 ** len(decimals)) if dot else Fraction(0)


def _text_answer(s: str) -> str | None:
    """Lower-cased word answer ("yes", "evelyn"); None for anything a math parser should read."""
    word = s.strip("()")
    if re.fullmatch(r"[A-Za-z]+", word) and (len(word) >= 3 or word.lower() in ("yes", "no")):
        return word.lower()
    return None


def _fast(pred: str, gold: str) -> str | None:
    p, g = _normalize(pred), _normalize(gold)
    if p == g:
        return "correct"
    pn, gn = _number(p), _number(g)
    if pn is not None and gn is not None:
        return "correct" if abs(pn - gn) <= _half_unit(g) else "wrong"
    word = _text_answer(g)
    if word is not None:
        return "correct" if p.strip("()").lower() == word else "wrong"
    return None


# --- worker side: math-verify with the number rules (runs only in worker processes; imports sympy lazily)


_DECIMAL = re.compile(r"(?<![\d.])\d*\.(\d+)")
# Decimal literals of the ground truth being checked -> their written decimal places (a worker checks one at a time).
_GOLD_PLACES: dict[Fraction, int] = {}


def _decimal_places(gold: str) -> dict[Fraction, int]:
    places: dict[Fraction, int] = {}
    for m in _DECIMAL.finditer(gold):
        value = Fraction(Decimal(m.group()))
        places[value] = max(places.get(value, 0), len(m.group(1)))
    return places


def _exact(e):
    """e with every Float replaced by the exact value of its decimal digits (0.1 -> 1/10, not the binary double)."""
    from sympy import Float, Rational
    return e.xreplace({f: Rational(*Fraction(str(f)).as_integer_ratio()) for f in e.atoms(Float)})


def _is_zero(d) -> bool:
    if d.is_zero is not None:
        return bool(d.is_zero)
    from sympy import simplify
    d = simplify(d)
    if d.is_zero is not None:
        return bool(d.is_zero)
    verdict = d.equals(0)  # minimal polynomials, surds, evaluation at increasing precision
    # None: no proof, but no nonzero digit either at sympy's highest evaluation precision, relative to the terms (a
    # float tolerance chops at an absolute ~1e-15): atan(1) + atan(2) + atan(3) - pi. A finite number that is zero.
    return verdict is True or verdict is None and d.is_number and d.is_finite is True


def _same(gold, pred) -> bool:
    """Exact equality: decimals at their written value, the difference exactly zero."""
    return _is_zero(_exact(gold) - _exact(pred))


def _near(gold, pred) -> bool:
    """pred rounds to the decimal gold: within half a unit of the gold's last written digit (module docstring)."""
    from sympy import Float, Rational
    if not (isinstance(gold, Float) and gold.is_finite):
        return False
    places = _GOLD_PLACES.get(abs(Fraction(str(gold))))
    if places is None:  # a float that was computed, not written (1.5\times 10^{-10}): exact rules
        return False
    diff, bound = abs(_exact(pred) - _exact(gold)), Rational(1, 2 * 10 ** places)
    if diff.free_symbols:
        return False
    if not diff.is_Rational:
        diff = diff.evalf(30)
    return bool(diff.is_comparable and diff <= bound)


def _percent(e):
    """X for math-verify's X\\% (X * UnevaluatedExpr(1/100)), else None."""
    from sympy import Mul, Rational, UnevaluatedExpr
    pct = UnevaluatedExpr(Rational(1, 100))
    if isinstance(e, Mul) and len(e.args) == 2 and pct in e.args:
        return e.args[0] if e.args[1] == pct else e.args[1]
    return None


def _values_equal(gold, pred, eq) -> bool:
    """eq over matrix entries and the readings of a percentage (module docstring)."""
    from math_verify.grader import safe_sympy_doit
    from sympy import MatrixBase
    if isinstance(gold, MatrixBase):
        gold, pred = safe_sympy_doit(gold), safe_sympy_doit(pred)
        return (isinstance(gold, MatrixBase) and isinstance(pred, MatrixBase) and gold.shape == pred.shape
                and all(_values_equal(g, p, eq) for g, p in zip(gold.flat(), pred.flat())))
    gx, px = _percent(gold), _percent(pred)
    if gx is not None and px is not None:
        pairs = [(gx, px)]
    elif gx is not None:
        pairs = [(gx, pred), (gx, pred * 100)]
    elif px is not None:
        pairs = [(gold, px), (gold, px / 100)]
    else:
        pairs = [(gold, pred)]
    return any(eq(safe_sympy_doit(g), safe_sympy_doit(p)) for g, p in pairs)


def _patch_math_verify() -> None:
    """Route math-verify's value comparisons through the number rules.

    math-verify compares every value -- plain answers, set and tuple items, interval ends, matrix entries, both sides
    of relations -- with grader.sympy_numeric_eq (floats rounded to 6 decimals, differences chopped below ~1e-15)
    and then grader.sympy_symbolic_eq (simplify). They become _near and _same for expressions and matrices; other
    objects keep math-verify's own comparison.
    """
    from math_verify import grader
    from sympy import Expr, MatrixBase
    numeric, symbolic = grader.sympy_numeric_eq, grader.sympy_symbolic_eq

    def ours(g, p) -> bool:
        return isinstance(g, Expr) and isinstance(p, Expr) or isinstance(g, MatrixBase) and isinstance(p, MatrixBase)

    grader.sympy_numeric_eq = lambda g, p, *a: _values_equal(g, p, _near) if ours(g, p) else numeric(g, p, *a)
    grader.sympy_symbolic_eq = lambda g, p: _values_equal(g, p, _same) if ours(g, p) else symbolic(g, p)


def _check_one(gold: str, pred: str) -> str:
    from math_verify import parse, verify
    _GOLD_PLACES.clear()
    _GOLD_PLACES.update(_decimal_places(gold))
    # Signal timeouts off (None): the parent enforces the limit by killing this process.
    g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if g and p and verify(g, p, timeout_seconds=None):
        return "correct"
    # parse() falls back to the raw string when no math was found: not equal and not math is a parse error.
    if not any(not isinstance(x, str) for x in g) or not any(not isinstance(x, str) for x in p):
        return "parse_error"
    return "wrong"


def _check(golds: list[str], pred: str) -> str:
    reasons = []
    for gold in golds:
        try:
            reasons.append(_check_one(gold, pred))
        except MemoryError:
            reasons.append("timeout")  # a resource limit, like the time limit
        except Exception:  # untrusted model output: any failure inside the parser means "unparseable"
            reasons.append("parse_error")
        if reasons[-1] == "correct":
            break
    return _merge(reasons)


def _serve(memory_limit: int) -> None:
    """A worker process's main loop: [golds, pred] as a JSON line on stdin -> a JSON reason line on stdout."""
    import logging
    import resource
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and closes our stdin
    # An answer whose evaluation allocates without bound fails with MemoryError here instead of exhausting the host.
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard == resource.RLIM_INFINITY or hard > memory_limit:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, hard))
    out = os.fdopen(os.dup(1), "w")  # private reply channel; anything printed goes to stderr
    os.dup2(2, 1)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _patch_math_verify()
    _check(["1"], "\\frac{2}{2}")  # warm-up: grammar and sympy caches are built before the first timed answer
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        out.write(json.dumps(_check(*json.loads(line))) + "\n")
        out.flush()


# --- worker processes

# Loads this file by path as a module of its own and serves; argv: this file's path, the memory limit.
_WORKER_SRC = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_bupo_reward_worker", sys.argv[1])
module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module._serve(int(sys.argv[2]))
"""


class _Worker:
    def __init__(self) -> None:
        argv = [sys.executable, "-P", "-c", _WORKER_SRC, os.path.abspath(__file__), str(int(MEMORY_LIMIT))]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.buf = b""
        self.ready = False

    def _readline(self, deadline: float) -> bytes | None:
        """One reply line, or None at the deadline or when the process died."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def check(self, golds: list[str], pred: str, timeout_s: float) -> str | None:
        if not self.ready:
            if self._readline(time.monotonic() + STARTUP_TIMEOUT_S) != b'"ready"':
                self.kill()
                raise RuntimeError(f"reward worker failed to start within {STARTUP_TIMEOUT_S:.0f} s "
                                   "(is math-verify installed? its error is on stderr)")
            self.ready = True
        deadline = time.monotonic() + timeout_s
        data = memoryview((json.dumps([golds, pred]) + "\n").encode())
        try:
            while data:  # a raw pipe write may be partial
                data = data[self.proc.stdin.write(data):]
        except BrokenPipeError:
            return None
        line = self._readline(deadline)
        return None if line is None else json.loads(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()

    def close(self, wait_s: float = 1.0) -> None:
        try:
            self.proc.stdin.close()  # the worker exits at end of input
            self.proc.wait(wait_s)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class _Pool:
    """Idle workers handed to one caller at a time; a timed-out worker is killed and replaced."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.cond = threading.Condition()
        self.idle: list[_Worker] = []
        self.all: set[_Worker] = set()
        self.max_workers = DEFAULT_WORKERS
        self.closed = False

    def acquire(self) -> _Worker | None:
        """A worker for one check; None once the pool is shut down."""
        with self.cond:
            while not self.closed and not self.idle and len(self.all) >= self.max_workers:
                self.cond.wait()
            if self.closed:
                return None
            if self.idle:
                return self.idle.pop()
            w = _Worker()
            self.all.add(w)
            return w

    def release(self, w: _Worker, healthy: bool) -> None:
        with self.cond:
            if healthy and not self.closed:
                self.idle.append(w)
                self.cond.notify()
                return
            self.all.discard(w)
            if not self.closed:
                fresh = _Worker()  # start the replacement now so its start-up overlaps other work
                self.all.add(fresh)
                self.idle.append(fresh)
                self.cond.notify()
        if healthy:
            w.close()
        else:
            w.kill()

    def shutdown(self) -> None:
        with self.cond:
            self.closed = True
            idle, busy = self.idle, self.all - set(self.idle)
            self.idle, self.all = [], set()
            self.cond.notify_all()
        for w in idle:
            w.close()
        for w in busy:
            w.proc.kill()  # its caller sees end-of-file, scores "timeout" and reaps it


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _get_pool(min_workers: int = 1) -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():  # a forked child never shares its parent's pipes
            _pool = _Pool()
        _pool.max_workers = max(_pool.max_workers, min_workers)
        return _pool


def shutdown() -> None:
    """Stop the worker processes (registered at exit too); a later score() starts new ones."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None and pool.pid == os.getpid():
        pool.shutdown()


atexit.register(shutdown)


def _verify(pred: str, golds: list[str], timeout_s: float) -> str:
    while (w := (pool := _get_pool()).acquire()) is None:
        pass  # shut down between the two calls: the next _get_pool() makes a new pool
    reason = None
    try:
        reason = w.check(golds, pred, timeout_s)
    finally:
        pool.release(w, healthy=reason is not None)
    # None: past the deadline, or the worker died (e.g. killed at shutdown) on this answer.
    return "timeout" if reason is None else reason


# --- public


def _decide(response: str, golds: list[str], in_think: bool = False) -> tuple[list[str], str | None, list[str]]:
    """(reasons decided without math-verify, canonical answer, ground truths left for math-verify)."""
    if not isinstance(response, str):
        raise TypeError(f"response is a {type(response).__name__}; need the generated text (a str)")
    text = answer_text(response, in_think)
    if text is None:
        return ["unclosed_think"], None, []
    pred = extract_boxed(text)
    if not pred:
        return ["no_answer"], None, []
    pred = _canonical(pred)
    decided, left = [], []
    for gold in map(_canonical, golds):
        reason = _fast(pred, gold)
        if reason == "correct":
            return [reason], pred, []
        if reason:
            decided.append(reason)
        else:
            left.append(gold)
    return decided, pred, left


def _result(reasons: list[str]) -> RewardResult:
    reason = _merge(reasons)
    return RewardResult(1.0 if reason == "correct" else 0.0, reason)


def score(response: str, ground_truth: str | list[str], *, timeout_s: float = 5.0,
          in_think: bool = False) -> RewardResult:
    """1.0 when the last boxed answer of `response` (after its reasoning: `answer_text`) equals `ground_truth` (or,
    for a list, any of its answers) mathematically under the rules of the module docstring, else 0.0, with a reason.
    in_think: the response starts inside a think block its prompt opened (bupo.data.Prompt.in_think).

    timeout_s bounds the math-verify check of one answer (all of a list's answers together), counted from the
    moment a ready worker receives it (a worker's start-up is not counted). Safe to call from any thread.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s}; must be > 0")
    reasons, pred, left = _decide(response, _golds(ground_truth), in_think)
    if left:
        reasons.append(_verify(pred, left, timeout_s))
    return _result(reasons)


def score_batch(responses: list[str], ground_truths: list[str | list[str]], *, timeout_s: float = 5.0,
                workers: int | None = None, in_think: list[bool] | None = None) -> list[RewardResult]:
    """score() for each pair with up to `workers` (default DEFAULT_WORKERS) math-verify checks in flight at once;
    results in input order, the same limit per answer. Every ground truth is checked before any work starts.
    in_think: per response, whether its prompt opened a think block (None: no prompt did)."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    in_think = [False] * len(responses) if in_think is None else list(in_think)
    if len(in_think) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(in_think)} in_think flags")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s}; must be > 0")
    workers = DEFAULT_WORKERS if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers={workers}; must be >= 1")
    golds = [_golds(g, f"ground_truths[{i}]") for i, g in enumerate(ground_truths)]
    decided = [_decide(r, g, t) for r, g, t in zip(responses, golds, in_think)]
    todo = [i for i, (_, _, left) in enumerate(decided) if left]
    if todo:
        _get_pool(workers)
        with ThreadPoolExecutor(max_workers=min(workers, len(todo))) as ex:
            checked = ex.map(lambda i: _verify(decided[i][1], decided[i][2], timeout_s), todo)
            for i, reason in zip(todo, checked):
                decided[i][0].append(reason)
    return [_result(reasons) for reasons, _, _ in decided]
