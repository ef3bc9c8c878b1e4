import threading
import time

import pytest

from bupo import reward
from bupo.reward import RewardResult, extract_boxed, score, score_batch

PATHOLOGICAL = r"Surely \boxed{9^{9^{9^9}}}"
LIMIT_S = 1.0
# A replacement worker's start-up (~1 s on 2 cores: python + math-verify import) is not part of the limit.
SLACK_S = 3.0


@pytest.mark.parametrize("text, boxed", [
    (r"so \boxed{5}.", "5"),
    (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed {x^{2}}", "x^{2}"),
    (r"\fbox{7}", "7"),
    (r"$\boxed 12$.", "12"),
    (r"\boxed 5.", "5"),
    (r"\boxed{ \text{Yes} }", r"\text{Yes}"),
    (r"\boxed{\frac{1}{2}", None),  # unclosed: the response was cut off
    (r"no box here: 42", None),
    (r"\boxedx{3}", None),
])
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


# (ground truth as in the BuPO files, boxed answer, equivalent?) in the files' answer styles.
PAIRS = [
    (r"\dfrac{2}{5}", r"\frac{2}{5}", True),
    (r"\dfrac{2}{5}", "0.4", True),
    (r"\frac{9}{256}", "9/256", True),
    (r"-\dfrac{1}{2}", r"-\frac12", True),
    (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}", True),
    (r"\frac{\sqrt{10}}{5}", r"\sqrt{\frac{2}{5}}", True),
    (r"\dfrac{2}{5}", r"\frac{5}{2}", False),
    (r"\infty", r"\infty", True),
    (r"\infty", r"+\infty", True),
    (r"\infty", r"-\infty", False),
    (r"(-\infty, -2)", r"(-\infty,-2)", True),
    (r"(-\infty, -2)", r"(-\infty,-2]", False),
    (r"(2,12) \cup (12,102)", r"(2,102)\setminus\{12\}", True),
    (r"x \in [-2,7]", "[-2,7]", True),
    (r"(-\infty, 0]", r"(-\infty, 0)", False),
    (r"2\sqrt{5}", r"\sqrt{20}", True),
    (r"2\sqrt{5}", r"\sqrt{10}", False),
    (r"3 \pm 2 \sqrt{2}", r"3+2\sqrt2, 3-2\sqrt2", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi)", False),
    (r"\begin{pmatrix} -2 \\ -14 \\ -7 \end{pmatrix}", r"\begin{pmatrix}-2\\-14\\-7\end{pmatrix}", True),
    ("Yes", "yes", True),
    ("Yes", r"\text{Yes}", True),
    ("Yes", "No", False),
    ("Yes", "sey", False),  # math-verify alone would read both as the product y*e*s
    ("True", "true", True),
    ("True", "False", False),
    (r"\text{Evelyn}", "Evelyn", True),
    (r"\text{Evelyn}", "Navin", False),
    ("025", "25", True),
    ("03125", "3125", True),
    ("540", "540.0", True),
    ("540", "541", False),
    (r"\$32,\!348", "32348", True),
    (r"11,\! 111,\! 111,\! 100", "11111111100", True),
    (r"120^\circ", "120", True),
    (r"120^\circ", r"120^{\circ}", True),
    (r"5.4 \text{ cents}", "5.4", True),
    (r"\text{(C)}", "C", True),
    (r"\text{(C)}", "(C)", True),
    (r"\text{(C)}", "D", False),
    ("D", r"\text{D}", True),
    ("B", "C", False),
    ("0.15", r"\frac{3}{20}", True),
    ("4.5", r"\frac92", True),
    ("8n^2 + 4n + 1", "4n+8n^2+1", True),
    ("8n^2 + 4n + 1", "8n^2+4n", False),
    (r"c \geq 1", r"c\ge1", True),
    ("2^{2n-1}", r"\frac{4^n}{2}", True),
    (r"\dfrac{\pi}{2}", r"\pi/2", True),
    (r"e^{\frac{1}{\pi}}", r"e^{1/\pi}", True),
]


def test_equivalence_table():
    responses = [f"Reasoning... The answer is $\\boxed{{{p}}}$." for _, p, _ in PAIRS]
    results = score_batch(responses, [g for g, _, _ in PAIRS], timeout_s=10.0)
    got = [(g, p, r.reason) for (g, p, _), r in zip(PAIRS, results)]
    want = [(g, p, "correct" if ok else "wrong") for g, p, ok in PAIRS]
    assert got == want
    assert [r.score for r in results] == [1.0 if ok else 0.0 for _, _, ok in PAIRS]


def test_no_answer_and_parse_error():
    assert score("I think it is 5.", "5") == RewardResult(0.0, "no_answer")
    assert score(r"\boxed{}", "5") == RewardResult(0.0, "no_answer")
    assert score(r"\boxed{\frac{1}{2}", "1/2") == RewardResult(0.0, "no_answer")  # truncated mid-box
    assert score(r"\boxed{?}", "3") == RewardResult(0.0, "parse_error")
    with pytest.raises(ValueError, match="timeout_s"):
        score(r"\boxed{1}", "1", timeout_s=0)


def test_time_limit_holds_in_a_worker_thread():
    out = {}

    def run():
        t0 = time.monotonic()
        out["result"] = score(PATHOLOGICAL, "1", timeout_s=LIMIT_S)
        out["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=run)
    th.start()
    th.join(LIMIT_S + SLACK_S + 5)
    assert not th.is_alive()
    assert out["result"] == RewardResult(0.0, "timeout")
    assert LIMIT_S * 0.9 <= out["elapsed"] <= LIMIT_S + SLACK_S
    # The killed worker was replaced: math-verify still works afterwards, from threads too.
    res = [None] * 3
    ths = [threading.Thread(target=lambda i=i: res.__setitem__(i, score(r"\boxed{\frac{2}{4}}", "0.5")))
           for i in range(3)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert res == [RewardResult(1.0, "correct")] * 3


def test_score_batch_keeps_order_and_limits_each_answer():
    responses = [PATHOLOGICAL, r"\boxed{2}", "nothing", r"\boxed{x+1}", PATHOLOGICAL, r"\boxed{\frac{6}{4}}",
                 r"\boxed{1+x}"]
    truths = ["1", "2", "3", "1+x", "2", r"\dfrac{3}{2}", "x+2"]
    want = ["timeout", "correct", "no_answer", "correct", "timeout", "correct", "wrong"]
    for workers in (1, 2):
        t0 = time.monotonic()
        got = score_batch(responses, truths, timeout_s=LIMIT_S, workers=workers)
        elapsed = time.monotonic() - t0
        assert [r.reason for r in got] == want
        assert elapsed <= 2 * LIMIT_S + 2 * SLACK_S  # never more than the two timeouts back to back
    assert score_batch([], []) == []
    with pytest.raises(ValueError, match="ground truths"):
        score_batch(["a"], [])


def test_shutdown_and_restart():
    assert score(r"\boxed{x^2}", "x*x").reason == "correct"
    reward.shutdown()
    assert reward._pool is None
    assert score(r"\boxed{x^2}", "x*x").reason == "correct"
    # Shutting down under a running check kills its worker: the caller gets "timeout" at once, not at the limit.
    out = []
    th = threading.Thread(target=lambda: out.append(score(PATHOLOGICAL, "1", timeout_s=60.0)))
    th.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    reward.shutdown()
    th.join(10)
    assert not th.is_alive() and time.monotonic() - t0 < 5
    assert out == [RewardResult(0.0, "timeout")]
    assert score(r"\boxed{x^2}", "x*x").reason == "correct"
