"""Distribution-free claims about a hop's quantile and loss rate from a handful of probes.

Why: "all 5 probes were under 5 s" does not show "p95 is under 5 s". Whatever the lag
distribution, each probe independently exceeds the true p95 with probability at most 5 %, so the
number of probes over the target is binomial. That gives exact, assumption-free answers:

* ``samples_needed(0.95, 0.95)`` = 59: all 59 within target shows p95 <= target with 95 %
  confidence (93 if one may exceed, 299 for p99);
* ``upper_bound(x, n, c)`` / ``lower_bound``: one-sided Clopper-Pearson bounds of a proportion
  (exceedances, losses) after ``x`` of ``n``;
* ``judge``: ``pass`` (the claim is shown), ``fail`` (disproven at the same confidence) or
  ``inconclusive`` (not enough evidence either way).

Pure standard library (``math.comb`` / ``fractions``): no SciPy for one beta quantile.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
OUTCOMES = (PASS, FAIL, INCONCLUSIVE)


def _exact(x: float) -> Fraction:
    """0.95 as the decimal the user wrote (19/20), not the nearest binary float."""
    return Fraction(repr(x))


def binom_cdf_exact(k: int, n: int, p: Fraction) -> Fraction:
    """P(Binomial(n, p) <= k), exactly."""
    q = 1 - p
    return sum((math.comb(n, i) * p**i * q ** (n - i) for i in range(min(k, n) + 1)), Fraction(0))


@functools.lru_cache(maxsize=1024)
def samples_needed(quantile: float, confidence: float, allowed: int = 0, limit: int = 100_000) -> int:
    """Smallest n such that at most ``allowed`` exceedances out of n show that the ``quantile``
    is within target with ``confidence``: if the true exceedance probability were 1 - quantile,
    seeing so few would have probability at most 1 - confidence."""
    p, alpha = 1 - _exact(quantile), 1 - _exact(confidence)
    if not 0 < p < 1 or not 0 < alpha < 1:
        raise ValueError("quantile and confidence must be strictly between 0 and 1")
    # Find n in floating point, then settle the boundary exactly (Fractions are slow at n ~ 600).
    n = allowed + 1
    while n <= limit and _cdf(allowed, n, float(p)) > float(alpha):
        n += 1
    while n > allowed + 1 and binom_cdf_exact(allowed, n - 1, p) <= alpha:
        n -= 1
    while n <= limit:
        if binom_cdf_exact(allowed, n, p) <= alpha:
            return n
        n += 1
    raise ValueError(f"more than {limit} samples needed")


def allowed_exceedances(quantile: float, confidence: float, n: int) -> int | None:
    """Most exceedances out of ``n`` that still show the claim; None if even zero cannot."""
    p, alpha = 1 - _exact(quantile), 1 - _exact(confidence)
    k = -1
    while k + 1 <= n and binom_cdf_exact(k + 1, n, p) <= alpha:
        k += 1
    return k if k >= 0 else None


def _cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k) in floating point, summed in log space (no overflow at large n)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    lg = math.lgamma
    base = lg(n + 1)
    return min(
        1.0, sum(math.exp(base - lg(i + 1) - lg(n - i + 1) + i * lp + (n - i) * lq) for i in range(k + 1))
    )


def _bisect(f, target: float) -> float:  # noqa: ANN001 - f: decreasing in p on [0, 1]
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@functools.lru_cache(maxsize=65536)
def upper_bound(x: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound of a proportion after ``x`` events in ``n`` trials:
    the largest p for which seeing ``x`` or fewer still has probability 1 - confidence."""
    if n <= 0:
        return 1.0
    if x >= n:
        return 1.0
    alpha = 1 - confidence
    if x == 0:
        return 1 - alpha ** (1 / n)  # closed form, and exact
    return _bisect(lambda p: _cdf(x, n, p), alpha)


@functools.lru_cache(maxsize=65536)
def lower_bound(x: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound: the smallest p for which seeing ``x`` or more
    still has probability 1 - confidence."""
    if n <= 0 or x <= 0:
        return 0.0
    alpha = 1 - confidence
    if x >= n:
        return alpha ** (1 / n)
    # P(X >= x) = alpha  <=>  P(X <= x - 1) = 1 - alpha, and the CDF decreases in p.
    return _bisect(lambda p: _cdf(x - 1, n, p), 1 - alpha)


@dataclass(frozen=True)
class Objective:
    """What a hop must show: its ``quantile`` within target, with ``confidence``; optionally a
    loss rate at most ``max_loss``."""

    quantile: float = 0.95
    confidence: float = 0.95
    max_loss: float | None = None
    strict: bool = False  # any exceedance fails (a negative probe that appeared: a breach)

    def needed(self) -> int:
        n = samples_needed(self.quantile, self.confidence)
        if self.max_loss is not None:
            n = max(n, samples_needed(1 - self.max_loss, self.confidence))
        return n


@dataclass(frozen=True)
class Claim:
    outcome: str
    n: int  # probes that count as evidence
    exceeded: int  # over target (late, lost, breach)
    lost: int
    ignored: int  # unknown / inject_failed: evidence neither way
    needed: int  # what the objective needs with no exceedance
    exceed_upper: float  # Clopper-Pearson upper bound of P(lag > target)
    exceed_lower: float
    loss_upper: float
    loss_lower: float
    undecided: int = 0  # in n: seen, but the lag interval straddles the target


def judge(
    objective: Objective, n: int, exceeded: int, lost: int, ignored: int = 0, undecided: int = 0
) -> Claim:
    """``pass`` when the upper confidence bound of the exceedance probability is within
    1 - quantile (and of the loss rate within max_loss); ``fail`` when the lower bound is past
    it (the claim is disproven at the same confidence); else ``inconclusive``.

    ``undecided`` probes (in ``n``; their lag interval straddles the target) are interval-censored:
    over the target for the pass bound, within it for the fail bound. Leaving them out instead
    would drop exactly the borderline probes and flatter the funnel."""
    c = objective.confidence
    allowed = 1 - objective.quantile
    eu, el = upper_bound(exceeded + undecided, n, c), lower_bound(exceeded, n, c)
    lu, ll = upper_bound(lost, n, c), lower_bound(lost, n, c)
    fail = (
        (objective.strict and exceeded > 0)
        or el > allowed
        or (objective.max_loss is not None and ll > objective.max_loss)
    )
    ok = n > 0 and eu <= allowed and (objective.max_loss is None or lu <= objective.max_loss)
    outcome = FAIL if fail else PASS if ok else INCONCLUSIVE
    return Claim(outcome, n, exceeded, lost, ignored, objective.needed(), eu, el, lu, ll, undecided)


def fail_certain(objective: Objective, n_done: int, exceeded: int, lost: int, remaining: int) -> bool:
    """Would the claim fail however the ``remaining`` probes turn out? The lower bounds only
    shrink as within-target probes are added, so check the best case: all remaining fine."""
    n = n_done + remaining
    c = objective.confidence
    if objective.strict and exceeded > 0:
        return True
    if lower_bound(exceeded, n, c) > 1 - objective.quantile:
        return True
    return objective.max_loss is not None and lower_bound(lost, n, c) > objective.max_loss


def quantile_name(q: float) -> str:
    """0.95 -> 'p95', 0.995 -> 'p99.5', 0.5 -> 'p50'."""
    return "p" + f"{q * 100:.4f}".rstrip("0").rstrip(".")


def fixed_outcome(
    objective: Objective, valid: int, exceeded: int, lost: int, pending: int, undecided: int = 0
) -> str | None:
    """The claim's outcome if ``pending`` more probes cannot change it, else None.

    Best case for passing: every pending probe counts and is within target; worst case for
    failing: every one counts and exceeds (an uncounted probe moves the bounds less)."""
    if pending <= 0:
        return judge(objective, valid, exceeded, lost, undecided=undecided).outcome
    if fail_certain(objective, valid, exceeded, lost, pending):
        return FAIL
    if judge(objective, valid + pending, exceeded, lost, undecided=undecided).outcome == PASS:
        return None
    worst = judge(objective, valid + pending, exceeded + pending, lost + pending, undecided=undecided)
    return None if worst.outcome == FAIL else INCONCLUSIVE
