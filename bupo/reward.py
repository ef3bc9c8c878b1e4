"""Math reward: the last \\boxed{...} of a response checked against the ground truth, with a hard time limit.

score() decides in three steps:
1. no box (or an empty one) -> no_answer;
2. fast path in-process: equal normalized strings -> correct; two plain numbers -> compared exactly ("025" == "25");
   a text ground truth ("Yes", "\\text{Evelyn}") -> case-insensitive string match only (math-verify would read
   "Yes" as the product Y*e*s and accept "sey");
3. otherwise math-verify (parse + verify) in a worker process, under a hard wall-clock limit.

Why worker processes: math-verify's own timeout uses SIGALRM, which only works in the main thread, and sympy can
hang in C code that no signal interrupts (`9^{9^{9^9}}`). Each worker is a small `python -c` process that imports
only math-verify (not this package, which may pull torch) and runs with math-verify's signal timeouts off; the
parent waits on its pipe with a deadline and kills the process when the deadline passes, so the limit holds from any
thread. The pool is created lazily, reused, grows up to the number of concurrent callers and shuts down at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

REASONS = ("correct", "wrong", "no_answer", "parse_error", "timeout")
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


# --- fast path


_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\$", "^{\\circ}", "^\\circ", "\\displaystyle")
_NUMBER = re.compile(r"-?(?:\d+|\d{1,3}(?:,\d{3})+)(?:\.\d+)?|-?\.\d+")


def _normalize(s: str) -> str:
    s = s.strip().strip("$")
    s = _TEXT_CMD.sub(r"\1", s)
    for d in _DROP:
        s = s.replace(d, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\ ", "")
    return re.sub(r"\s+", "", s).rstrip(".")


def _number(s: str) -> Fraction | None:
    return Fraction(s.replace(",", "")) if _NUMBER.fullmatch(s) else None


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
        return "correct" if pn == gn else "wrong"
    word = _text_answer(g)
    if word is not None:
        return "correct" if p.strip("()").lower() == word else "wrong"
    return None


# --- worker processes

_WORKER_SRC = r"""
import json, logging, os, resource, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and closes our stdin
# An answer whose evaluation allocates without bound fails with MemoryError here instead of exhausting the host.
_hard = resource.getrlimit(resource.RLIMIT_AS)[1]
if _hard == resource.RLIM_INFINITY or _hard > MEMORY_LIMIT:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, _hard))
out = os.fdopen(os.dup(1), "w")  # private reply channel; anything printed goes to stderr
os.dup2(2, 1)
logging.getLogger("math_verify").setLevel(logging.ERROR)
from math_verify import parse, verify

def check(gold, pred):
    # Signal timeouts off (None): the parent enforces the limit by killing this process.
    g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if g and p and verify(g, p, timeout_seconds=None):
        return "correct"
    # parse() falls back to the raw string when no math was found: not equal and not math is a parse error.
    if not any(not isinstance(x, str) for x in g) or not any(not isinstance(x, str) for x in p):
        return "parse_error"
    return "wrong"

check("1", "\\frac{2}{2}")  # warm-up: grammar and sympy caches are built before the first timed answer
out.write('"ready"\n')
out.flush()
for line in sys.stdin:
    gold, pred = json.loads(line)
    try:
        reason = check(gold, pred)
    except MemoryError:
        reason = "timeout"  # a resource limit, like the time limit
    except Exception:  # untrusted model output: any failure inside the parser means "unparseable"
        reason = "parse_error"
    out.write(json.dumps(reason) + "\n")
    out.flush()
"""


class _Worker:
    def __init__(self) -> None:
        src = f"MEMORY_LIMIT = {int(MEMORY_LIMIT)}\n" + _WORKER_SRC
        self.proc = subprocess.Popen([sys.executable, "-P", "-c", src], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
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

    def check(self, gold: str, pred: str, timeout_s: float) -> str | None:
        if not self.ready:
            if self._readline(time.monotonic() + STARTUP_TIMEOUT_S) != b'"ready"':
                self.kill()
                raise RuntimeError(f"reward worker failed to start within {STARTUP_TIMEOUT_S:.0f} s "
                                   "(is math-verify installed? its error is on stderr)")
            self.ready = True
        deadline = time.monotonic() + timeout_s
        data = memoryview((json.dumps([gold, pred]) + "\n").encode())
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


def _verify(pred: str, gold: str, timeout_s: float) -> str:
    while (w := (pool := _get_pool()).acquire()) is None:
        pass  # shut down between the two calls: the next _get_pool() makes a new pool
    reason = None
    try:
        reason = w.check(gold, pred, timeout_s)
    finally:
        pool.release(w, healthy=reason is not None)
    # None: past the deadline, or the worker died (e.g. killed at shutdown) on this answer.
    return "timeout" if reason is None else reason


# --- public


def _decide(response: str, ground_truth: str) -> tuple[str | None, str | None]:
    """(reason, None) when decided without math-verify, else (None, extracted answer)."""
    pred = extract_boxed(response)
    if not pred:
        return "no_answer", None
    reason = _fast(pred, ground_truth)
    return reason, (None if reason else pred)


def _result(reason: str) -> RewardResult:
    return RewardResult(1.0 if reason == "correct" else 0.0, reason)


def score(response: str, ground_truth: str, *, timeout_s: float = 5.0) -> RewardResult:
    """1.0 when the last boxed answer of `response` equals `ground_truth` mathematically, else 0.0, with a reason.

    timeout_s bounds the math-verify check of one answer, counted from the moment a ready worker receives it (a
    worker's start-up is not counted). Safe to call from any thread.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s}; must be > 0")
    reason, pred = _decide(response, ground_truth)
    return _result(reason or _verify(pred, ground_truth, timeout_s))


def score_batch(responses: list[str], ground_truths: list[str], *, timeout_s: float = 5.0,
                workers: int | None = None) -> list[RewardResult]:
    """score() for each pair with up to `workers` (default DEFAULT_WORKERS) math-verify checks in flight at once;
    results in input order, the same limit per answer."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s}; must be > 0")
    workers = DEFAULT_WORKERS if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers={workers}; must be >= 1")
    decided = [_decide(r, g) for r, g in zip(responses, ground_truths)]
    reasons = [reason for reason, _ in decided]
    todo = [i for i, (reason, _) in enumerate(decided) if reason is None]
    if todo:
        _get_pool(workers)
        with ThreadPoolExecutor(max_workers=min(workers, len(todo))) as ex:
            checked = ex.map(lambda i: _verify(decided[i][1], ground_truths[i], timeout_s), todo)
            for i, reason in zip(todo, checked):
                reasons[i] = reason
    return [_result(r) for r in reasons]
