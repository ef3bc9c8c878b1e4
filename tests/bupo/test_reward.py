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


def _reasons(table, **kw):
    """(gold, answer, reason) for each row of a (gold, answer, want) table, scored in one batch."""
    results = score_batch([f"The answer is $\\boxed{{{p}}}$." for _, p, _ in table], [g for g, _, _ in table],
                          timeout_s=10.0, **kw)
    return [(g, p, r.reason) for (g, p, _), r in zip(table, results)]


# Issue 14.2: math-verify chops differences below ~1e-15 and rounds floats to 6 decimals.
EXACT = [
    ("2^{-60}", "2^{-61}", "wrong"),  # the example
    ("2^{-60}", r"\frac{1}{2^{60}}", "correct"),
    ("3^{-243}", "3^{-242}", "wrong"),
    ("e^{-100}", "e^{-101}", "wrong"),
    (r"10^{-20}", "0", "wrong"),
    ("0", r"\frac{1}{10^{9}}", "wrong"),
    ("10^{20}", "10^{20}+1", "wrong"),
    ("10^{20}", "100000000000000000000", "correct"),
    ("100000000000000000000", "100000000000000000001", "wrong"),
    ("2^{100}", "2^{100}+1", "wrong"),
    ("2^{100}", "1267650600228229401496703205376", "correct"),
    ("100!", "100!+1", "wrong"),
    ("100!", "100 \\cdot 99!", "correct"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", "correct"),
    (r"\sqrt{3+2\sqrt{2}}", r"1+\sqrt{2}", "correct"),
    (r"\frac{1+\sqrt{5}}{4}", r"\cos\frac{\pi}{5}", "correct"),
    (r"\pi", r"\arctan 1 + \arctan 2 + \arctan 3", "correct"),  # no proof found: zero at sympy's top precision
    (r"\pi", r"\frac{355}{113}", "wrong"),
    ("262537412640768744", r"e^{\pi\sqrt{163}}", "wrong"),  # 7.5e-13 apart
    (r"\sqrt{2}", "1.41421356", "wrong"),  # an exact ground truth wants the exact value
    (r"\frac{1}{3}", "0.3333", "wrong"),
    (r"\frac{1}{3}", "0.333333", "wrong"),  # math-verify's 6-decimal rounding accepted this
    (r"\frac{1}{3}", "0.33333333333333333333", "wrong"),
    (r"\frac{2}{5}", "0.4", "correct"),  # a decimal means its written value
    (r"\frac{1}{8}", "0.125", "correct"),
    ("2\\pi", "6.2832", "wrong"),
    ("2\\pi", "6.283185307179586", "wrong"),
    ("2\\pi", r"\frac{4\pi}{2}", "correct"),
    # the same kind inside structures: relations, tuples, intervals, sets, matrices, coefficients, exponents
    ("x = 2^{-61}", "x = 2^{-60}", "wrong"),
    ("x = 2^{-61}", "x = \\frac{1}{2^{61}}", "correct"),
    ("(2^{-61}, 1)", "(2^{-60}, 1)", "wrong"),
    (r"\{2^{-61}, 1\}", r"\{2^{-60}, 1\}", "wrong"),
    (r"\begin{pmatrix} 2^{-61} \\ 1 \end{pmatrix}", r"\begin{pmatrix} 2^{-60} \\ 1 \end{pmatrix}", "wrong"),
    (r"\begin{pmatrix} 2^{-61} \\ 1 \end{pmatrix}", r"\begin{pmatrix} \frac{1}{2^{61}} \\ 1 \end{pmatrix}", "correct"),
    ("2^{-61}x", "2^{-60}x", "wrong"),
    ("x^{2^{-61}}", "x^{2^{-60}}", "wrong"),
    ("0.5x", r"\frac{x}{2}", "correct"),  # a decimal inside an expression is exact
    ("0.5x", "0.51x", "wrong"),
]


def test_exact_values_compare_exactly():
    assert _reasons(EXACT) == EXACT


# A decimal ground truth is a rounding: an answer is correct when it rounds to it (half a unit of its last digit).
DECIMAL = [
    ("0.0466", "0.0466", "correct"),
    ("0.0466", "0.04663", "correct"),
    ("0.0466", "0.04655", "correct"),  # the half-unit ends are included
    ("0.0466", "0.04654", "wrong"),
    ("0.0466", "0.047", "wrong"),  # less precise than the ground truth
    ("0.0466", "0.0467", "wrong"),
    ("0.0466", r"\frac{233}{5000}", "correct"),
    ("-2.5", "-2.54", "correct"),
    ("-2.5", "2.5", "wrong"),
    ("0.5", r"\frac{1}{2}", "correct"),
    ("0.5", "0.54", "correct"),
    ("0.5", "0.56", "wrong"),
    ("0.0000001", "0.0000002", "wrong"),  # math-verify rounded both to 0.000000
    ("0.0000001", "10^{-7}", "correct"),
    ("0.220000", "0.2200004", "correct"),
    ("0.220000", "0.22001", "wrong"),  # written trailing zeros count
    ("6.2832", "2\\pi", "correct"),
    ("3.14", "\\pi", "correct"),
    ("3.14", "3", "wrong"),
    ("2.72", "e", "correct"),
    ("540", "540.0", "correct"),  # an integer ground truth is exact
    ("540", "540.01", "wrong"),
    ("5.10\\%", "5.1\\%", "correct"),
    ("5.10\\%", "5.1", "correct"),  # a percentage is also its bare number ...
    ("5.10\\%", "0.051", "correct"),  # ... and its value
    ("5.10\\%", "5.2\\%", "wrong"),
    ("9\\%", "0.09", "correct"),
    ("9\\%", "0.1", "wrong"),
    ("(0.5, 0.6)", "(0.52, 0.6)", "correct"),  # each written decimal of a tuple is a rounding
    ("(0.5, 0.6)", "(0.5, 0.7)", "wrong"),
]


def test_decimal_ground_truth_is_a_rounding():
    assert _reasons(DECIMAL) == DECIMAL


COMMAS = [
    ("500", "0,500", "wrong"),  # the example: a leading 0 group is no thousands grouping
    ("0.5", "0,500", "wrong"),  # nor a decimal comma
    (r"\{0, 500\}", "0,500", "correct"),
    ("1000", "1,000", "correct"),
    ("1,000", "1000", "correct"),
    ("1000000", "1,000,000", "correct"),
    ("58,500", "58500", "correct"),
    ("-1000", "-1,000", "correct"),
    ("1234.5", "1,234.5", "correct"),
    (r"\$1,000", "1000", "correct"),
    ("1000", r"1,000 \text{ dollars}", "correct"),
    ("10080", r"10,\!080", "correct"),
    (r"11,\! 111,\! 111,\! 100", "11111111100", "correct"),
    ("10080", "10{,}080", "correct"),
    ("1000", r"1\,000", "correct"),
    ("1000", "1 000", "correct"),
    ("1000", "1,0000", "wrong"),  # groups of exactly three
    ("1000000", "1,000,00", "wrong"),
    ("1000", "1, 000", "wrong"),  # a space after the comma: a list
    ("1, 2", "1,2", "correct"),
    ("1,2", "1, 2", "correct"),
    ("2,6", "6, 2", "correct"),
    ("12,34", "1234", "wrong"),
    ("12,34", r"\{12, 34\}", "correct"),
    ("12,34", "12.34", "wrong"),
    ("3.5", "3,5", "wrong"),  # a comma is never a decimal point
    ("3,5", "3, 5", "correct"),
    ("(2, 100)", "(2,100)", "correct"),  # in brackets a comma separates items
    ("2100", "(2,100)", "wrong"),
    ("[1, 200]", "[1,200]", "correct"),
    ("(1000, 2)", r"(1{,}000, 2)", "correct"),  # an explicit separator works in brackets too
]


def test_commas_in_numbers():
    assert _reasons(COMMAS) == COMMAS


ORDINALS = [
    ("12", r"12^{\text{th}}", "correct"),  # the example
    ("12", "12th", "correct"),
    ("12", "12^{th}", "correct"),
    ("12", r"12^\text{th}", "correct"),
    ("12", r"12\text{th}", "correct"),
    ("12", r"12\textsuperscript{th}", "correct"),
    ("1", "1st", "correct"),
    ("2", "2nd", "correct"),
    ("3", "3^{rd}", "correct"),
    ("21", r"21^\text{st}", "correct"),
    ("22", r"22^{\mathrm{nd}}", "correct"),
    ("11", r"11^{\text{th}}", "correct"),
    ("113", "113th", "correct"),
    ("1000", r"1,000^{\text{th}}", "correct"),
    (r"12^{\text{th}}", "12", "correct"),
    (r"5^{\text{th}}", "5th", "correct"),
    ("12", r"\text{12th}", "correct"),
    ("12", r"13^{\text{th}}", "wrong"),
    ("1", r"1000^{\text{th}}", "wrong"),
]


def test_ordinal_suffixes():
    assert _reasons(ORDINALS) == ORDINALS


@pytest.mark.parametrize("text, canonical", [
    ("0,500", "0, 500"),
    ("1,000", "1000"),
    ("1,000,000.25", "1000000.25"),
    ("12,34", "12, 34"),
    ("(2,100)", "(2, 100)"),
    (r"\left(1{,}000, 5\right)", r"\left(1000, 5\right)"),
    (r"11,\! 111,\! 100", "11111100"),
    ("x^2 300", "x^2 300"),  # a space after an exponent digit is no thousands separator
    (r"12^{\text{th}}", "12"),
    ("2^{th}", "2^{th}"),  # not 2's suffix: maybe a power
    (r"\theta_2", r"\theta_2"),
    ("1st, 2nd", "1, 2"),
    ("a+2nd", "a+2nd"),  # letters may be variables: 2*n*d
    (r"\text{12th}", r"\text{12}"),
    (r"a+2^{\text{nd}}", "a+2"),
])
def test_canonical_form(text, canonical):
    assert reward._canonical(text) == canonical


def test_ground_truth_of_any_json_type():
    assert score(r"\boxed{5}", 5) == RewardResult(1.0, "correct")
    assert score(r"\boxed{25}", 25.0) == RewardResult(1.0, "correct")
    assert score(r"\boxed{0.00001}", 1e-05) == RewardResult(1.0, "correct")
    assert score(r"\boxed{\frac{1}{2}}", 0.5) == RewardResult(1.0, "correct")
    assert score(r"\boxed{0.30}", 0.3) == RewardResult(1.0, "correct")  # a float is its shortest repr, "0.3"
    assert score(r"\boxed{\infty}", float("inf")) == RewardResult(1.0, "correct")
    assert score(r"\boxed{True}", True) == RewardResult(1.0, "correct")
    assert score(r"\boxed{5}", False) == RewardResult(0.0, "wrong")
    assert score(r"\boxed{5}", ["5"]) == RewardResult(1.0, "correct")  # raised AttributeError
    assert score(r"\boxed{5}", ("4", 5)) == RewardResult(1.0, "correct")
    assert score("no box", ["5", "6"]) == RewardResult(0.0, "no_answer")
    for bad in (None, {"ground_truth": "5"}, [["5"]], ["5", None], b"5"):
        with pytest.raises(TypeError, match="ground_truth"):
            score(r"\boxed{5}", bad)
    for bad in ("", "  ", [], float("nan")):
        with pytest.raises(ValueError, match="ground_truth"):
            score(r"\boxed{5}", bad)
    with pytest.raises(TypeError, match=r"ground_truths\[1\]"):
        score_batch([r"\boxed{5}"] * 2, ["5", None])
    with pytest.raises(TypeError, match="response"):
        score(None, "5")


def test_list_ground_truth_accepts_any_answer():
    table = [(["5", "6"], "5", "correct"), (["5", "6"], "6", "correct"), (["5", "6"], "7", "wrong"),
             ([r"\frac{1}{2}", "x"], "0.5", "correct"), ([r"\frac{1}{2}", "x"], "y", "wrong"),
             ([r"\text{Yes}", "1"], "yes", "correct")]
    got = score_batch([f"\\boxed{{{p}}}" for _, p, _ in table], [g for g, _, _ in table], timeout_s=10.0)
    assert [r.reason for r in got] == [want for _, _, want in table]
    # One limit for the whole list; a compared answer beats a timed-out one.
    t0 = time.monotonic()
    assert score(r"\boxed{4}", ["9^{9^{9^9}}", "5"], timeout_s=LIMIT_S) == RewardResult(0.0, "wrong")
    assert score(PATHOLOGICAL, ["1", "2"], timeout_s=LIMIT_S) == RewardResult(0.0, "timeout")
    assert time.monotonic() - t0 <= 2 * (LIMIT_S + SLACK_S)


def test_list_ground_truth_from_parquet_is_rewarded(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    from bupo.data import load_rows
    path = tmp_path / "multi.parquet"
    messages = [{"role": "user", "content": "Name a root of (x-5)(x-6)."}]
    pq.write_table(pa.table({"prompt": [messages] * 3, "reward_model": [
        {"ground_truth": ["5", "6"]}, {"ground_truth": ["7"]}, {"ground_truth": ["", None]}]}), path)
    with pytest.warns(UserWarning, match="skipped 1 rows without a ground truth"):
        rows, stats = load_rows(path)
    assert [r.ground_truth for r in rows] == [["5", "6"], "7"]
    got = score_batch([r"\boxed{6}", r"\boxed{7}"], [r.ground_truth for r in rows])
    assert [r.reason for r in got] == ["correct", "correct"]


# --- thinking responses: the answer is read after the reasoning


@pytest.mark.parametrize("response, in_think, want", [
    # the example: a tentative box inside reasoning cut off by max_new_tokens is no answer
    ("<think>\nLet me see... so maybe \\boxed{5} but wait, I should check", False, (0.0, "unclosed_think")),
    ("<think>so maybe \\boxed{4}</think>\n\nThe answer is \\boxed{5}.", False, (1.0, "correct")),
    ("<think>so maybe \\boxed{5}</think>\n\nThe answer is \\boxed{4}.", False, (0.0, "wrong")),
    ("<think>it is \\boxed{5}</think>\n\nI am done.", False, (0.0, "no_answer")),  # only boxed while reasoning
    ("<think>a</think>\\boxed{5}<think>on second thought", False, (0.0, "unclosed_think")),  # reasoning again, cut
    ("The answer is \\boxed{5}.", False, (1.0, "correct")),  # no think tags: read whole, as before
    # the prompt opened the block (Qwen3-*-Thinking-2507): the response starts inside the reasoning
    ("so maybe \\boxed{5} but", True, (0.0, "unclosed_think")),
    ("so maybe \\boxed{4}\n</think>\n\n\\boxed{5}", True, (1.0, "correct")),
])
def test_the_answer_of_a_thinking_response_is_read_after_its_reasoning(response, in_think, want):
    got = score(response, "5", in_think=in_think)
    assert (got.score, got.reason) == want
    got = score_batch([response], ["5"], in_think=[in_think])[0]
    assert (got.score, got.reason) == want


def test_unclosed_think_is_a_reason_the_trainer_counts():
    from bupo.reward import REASONS, answer_text

    assert "unclosed_think" in REASONS  # bupo.train logs reward/<reason> for each of REASONS
    assert answer_text("<think>x \\boxed{5}") is None and answer_text("\\boxed{5}") == "\\boxed{5}"
    with pytest.raises(ValueError, match="2 responses but 1 in_think"):
        score_batch(["a", "b"], ["1", "2"], in_think=[True])
