"""pass_at_k: brute force over subsets, closed forms, stability at n = 300, k = 256, input checks."""

import itertools
import math
from fractions import Fraction

import pytest

from bupo.evals.passk import pass_at_k, report


def brute(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_matches_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute(n, c, k), abs=1e-12), (n, c, k)


def test_known_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(300, 150, 1) == pytest.approx(0.5)


def test_stable_at_n300_k256():
    n, k = 300, 256
    prev_c = -1.0
    for c in range(n + 1):
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        got = pass_at_k(n, c, k)
        assert 0.0 <= got <= 1.0 and math.isfinite(got)
        assert got == pytest.approx(float(exact), rel=1e-12, abs=1e-15), c
        assert got >= prev_c  # monotone in c
        prev_c = got
    for c in (1, 2, 10, 44):
        vals = [pass_at_k(n, c, k) for k in (1, 4, 16, 64, 256)]
        assert vals == sorted(vals)  # monotone in k
    assert pass_at_k(300, 1, 1) == pytest.approx(1 / 300, rel=1e-12)  # small values keep their precision


@pytest.mark.parametrize("n,c,k", [(4, 0, 5), (4, 5, 1), (-1, 0, 1), (4, -1, 1), (4, 1, 0), (0, 0, 1),
                                   (4.0, 1, 1), (4, True, 1)])
def test_invalid(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


class _Row:
    def __init__(self, index):
        self.index = index


class _Prompt:
    def __init__(self, index):
        self.row = _Row(index)


def test_report_per_dataset_and_overall():
    n = 4
    correct = {("a", 0): 4, ("a", 1): 0, ("b", 7): 1}
    rows = {(d, p, j): {"score": float(j < c), "response_tokens": 10, "finished": j != 0}
            for (d, p), c in correct.items() for j in range(n + 2)}  # extra samples beyond n are ignored
    rep = report({"a": [_Prompt(0), _Prompt(1)], "b": [_Prompt(7)]}, rows, n, [1, 2, 4])
    a, b = rep["datasets"]["a"], rep["datasets"]["b"]
    assert a["avg"] == 0.5 and a["pass@k"]["4"] == 0.5 and a["truncated_frac"] == 0.25
    assert b["avg"] == 0.25 and b["pass@k"]["2"] == pytest.approx(0.5) and b["pass@k"]["4"] == 1.0
    assert rep["overall"]["avg"] == pytest.approx(0.375)
    assert rep["overall"]["pass@k"]["4"] == pytest.approx(0.75)
