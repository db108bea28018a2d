"""Bootstrap CIs and paired comparisons: exact on hand-built data, deterministic given a seed."""

from __future__ import annotations

import math
import random

import pytest

from pop_nemo.eval.stats import bootstrap_mean, paired_comparison, sign_test_p


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    xs = [0.1, 0.9, 0.4, 0.4, 0.7, 0.2, 1.0, 0.0]
    a = bootstrap_mean(xs, 500, 0.95, seed=7)
    assert a == bootstrap_mean(xs, 500, 0.95, seed=7)
    assert a != bootstrap_mean(xs, 500, 0.95, seed=8)
    assert a.mean == pytest.approx(sum(xs) / len(xs))
    assert a.n == len(xs)
    assert min(xs) <= a.low < a.mean < a.high <= max(xs)


def test_bootstrap_edge_cases():
    assert bootstrap_mean([], 100).to_dict() == {"mean": None, "low": None, "high": None, "n": 0}
    assert bootstrap_mean([None, None], 100).n == 0
    one = bootstrap_mean([0.25], 100)
    assert (one.mean, one.low, one.high, one.n) == (0.25, 0.25, 0.25, 1)
    const = bootstrap_mean([0.5] * 6, 100)
    assert (const.low, const.high) == (0.5, 0.5)
    assert bootstrap_mean([1.0, None, 0.0], 100).n == 2  # None = no score, left out


def test_bootstrap_width_matches_normal_theory():
    rng = random.Random(0)
    xs = [rng.gauss(0.0, 1.0) for _ in range(400)]
    est = bootstrap_mean(xs, 2000, 0.95, seed=1)
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    half = 1.96 * sd / math.sqrt(len(xs))
    assert est.high - est.low == pytest.approx(2 * half, rel=0.12)
    assert (est.low + est.high) / 2 == pytest.approx(mean, abs=0.25 * half)
    narrow = bootstrap_mean(xs, 2000, 0.5, seed=1)
    assert narrow.high - narrow.low < est.high - est.low


def test_sign_test_exact_values():
    assert sign_test_p(0, 0) is None
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert sign_test_p(3, 3) == 1.0
    # two-sided: 2 * P(X <= 1) for n=6
    assert sign_test_p(1, 5) == pytest.approx(2 * (1 + 6) / 64)


def test_paired_comparison_counts_ties_as_half_and_ignores_unpaired_units():
    a = {"p1": 0.5, "p2": 0.5, "p3": 0.2, "p4": 0.9, "only_a": 1.0, "none_b": 0.3}
    b = {"p1": 0.75, "p2": 0.5, "p3": 0.6, "p4": 0.4, "only_b": 0.0, "none_b": None}
    p = paired_comparison(a, b, resamples=400, confidence=0.9, seed=3)
    assert p.n == 4
    assert (p.wins, p.losses, p.ties) == (2, 1, 1)
    assert p.mean_a == pytest.approx((0.5 + 0.5 + 0.2 + 0.9) / 4)
    assert p.mean_b == pytest.approx((0.75 + 0.5 + 0.6 + 0.4) / 4)
    assert p.diff.mean == pytest.approx((0.25 + 0.0 + 0.4 - 0.5) / 4)
    assert p.win_rate.mean == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert p.diff.low <= p.diff.mean <= p.diff.high
    assert 0.0 <= p.win_rate.low <= p.win_rate.high <= 1.0
    assert p.sign_test_p == pytest.approx(sign_test_p(2, 1))
    assert p == paired_comparison(a, b, resamples=400, confidence=0.9, seed=3)


def test_paired_comparison_of_identical_models_is_all_ties():
    a = {f"p{i}": i / 10 for i in range(10)}
    p = paired_comparison(a, dict(a), resamples=200)
    assert (p.wins, p.losses, p.ties) == (0, 0, 10)
    assert (p.diff.mean, p.diff.low, p.diff.high) == (0.0, 0.0, 0.0)
    assert (p.win_rate.mean, p.win_rate.low, p.win_rate.high) == (0.5, 0.5, 0.5)
    assert p.sign_test_p is None


def test_paired_comparison_without_common_units():
    p = paired_comparison({"a": 1.0}, {"b": 0.0}, resamples=100)
    assert p.n == 0 and p.mean_a is None and p.diff.mean is None and p.win_rate.mean is None
