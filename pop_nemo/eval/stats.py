"""Bootstrap confidence intervals and paired comparisons, deterministic given a seed.

Units are *problems* (or conversations): answers to one problem are averaged first, so a
problem with 4 sampled answers weighs as much as a problem with 1, and the bootstrap resamples
problems, the level at which evaluation data are independent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A mean with a percentile-bootstrap confidence interval (None when there is no data)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed % (2**63))


def bootstrap_mean(values: Sequence[float], resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of ``values`` and its percentile bootstrap interval.

    One value gives a zero-width interval at the value; none gives all None.
    """
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return Estimate(None, None, None, 0)
    mean = float(x.mean())
    if x.size == 1:
        return Estimate(mean, mean, mean, 1)
    idx = _rng(seed).integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Estimate(mean, float(low), float(high), int(x.size))


def sign_test_p(wins: int, losses: int) -> float | None:
    """Exact two-sided sign test on the non-tied pairs (None without any)."""
    n = wins + losses
    if n == 0:
        return None
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class Paired:
    """B against A on the units both scored: mean difference B−A and win rate of B.

    ``win_rate`` counts a tie as half a win, so 0.5 means no difference.
    """

    n: int
    mean_a: float | None
    mean_b: float | None
    diff: Estimate
    win_rate: Estimate
    wins: int
    losses: int
    ties: int
    sign_test_p: float | None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["diff"], d["win_rate"] = self.diff.to_dict(), self.win_rate.to_dict()
        return d


def paired_comparison(
    a: Mapping[str, float | None],
    b: Mapping[str, float | None],
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    tie_tol: float = 1e-9,
) -> Paired:
    """Compare per-unit scores of two models keyed by unit id (a problem's doc id, a conversation id).

    Units missing or None on either side are left out. Differences and wins are bootstrapped
    with the same resampled units (paired bootstrap).
    """
    keys = sorted(k for k in a.keys() & b.keys() if a[k] is not None and b[k] is not None)
    xa = np.asarray([a[k] for k in keys], dtype=np.float64)
    xb = np.asarray([b[k] for k in keys], dtype=np.float64)
    d = xb - xa
    win = np.where(d > tie_tol, 1.0, np.where(d < -tie_tol, 0.0, 0.5))
    wins, losses = int((d > tie_tol).sum()), int((d < -tie_tol).sum())
    return Paired(
        n=len(keys),
        mean_a=float(xa.mean()) if keys else None,
        mean_b=float(xb.mean()) if keys else None,
        diff=bootstrap_mean(d.tolist(), resamples, confidence, seed),
        win_rate=bootstrap_mean(win.tolist(), resamples, confidence, seed),  # same seed: same resampled units
        wins=wins,
        losses=losses,
        ties=len(keys) - wins - losses,
        sign_test_p=sign_test_p(wins, losses),
    )
