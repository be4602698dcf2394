"""The binomial claims against exact values (closed forms and published order-statistic tables)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from tracer import stats


def test_samples_needed_match_the_order_statistic_tables() -> None:
    assert stats.samples_needed(0.95, 0.95) == 59
    assert stats.samples_needed(0.95, 0.95, allowed=1) == 93
    assert stats.samples_needed(0.99, 0.95) == 299
    assert stats.samples_needed(0.95, 0.99) == 90
    assert stats.samples_needed(0.5, 0.95) == 5
    # The boundary is exact: 0.95^59 < 0.05 < 0.95^58.
    assert Fraction(19, 20) ** 59 < Fraction(1, 20) < Fraction(19, 20) ** 58


def test_allowed_exceedances_is_the_inverse() -> None:
    assert stats.allowed_exceedances(0.95, 0.95, 58) is None
    assert stats.allowed_exceedances(0.95, 0.95, 59) == 0
    assert stats.allowed_exceedances(0.95, 0.95, 92) == 0
    assert stats.allowed_exceedances(0.95, 0.95, 93) == 1


def test_clopper_pearson_bounds_against_known_values() -> None:
    # x = 0 and x = n have closed forms.
    assert stats.upper_bound(0, 59, 0.95) == pytest.approx(1 - 0.05 ** (1 / 59), abs=1e-12)
    assert stats.lower_bound(10, 10, 0.95) == pytest.approx(0.05 ** (1 / 10), abs=1e-12)
    # Beta quantiles (one-sided 95 %): Beta(2, 9) 0.95 quantile and Beta(9, 2) 0.05 quantile.
    assert stats.upper_bound(1, 10, 0.95) == pytest.approx(0.39416, abs=1e-5)
    assert stats.lower_bound(9, 10, 0.95) == pytest.approx(0.60584, abs=1e-5)
    assert stats.lower_bound(1, 10, 0.95) == pytest.approx(1 - 0.95 ** (1 / 10), abs=1e-9)
    # The "rule of three": 0 of 100 bounds the rate near 3 / n.
    assert stats.upper_bound(0, 100, 0.95) == pytest.approx(0.0295, abs=1e-4)
    # By definition the binomial CDF at the upper bound is 1 - confidence.
    p = stats.upper_bound(3, 200, 0.9)
    assert float(stats.binom_cdf_exact(3, 200, Fraction(p))) == pytest.approx(0.1, abs=1e-9)


def test_judge_pass_fail_inconclusive() -> None:
    obj = stats.Objective()
    assert stats.judge(obj, 59, 0, 0).outcome == stats.PASS
    assert stats.judge(obj, 58, 0, 0).outcome == stats.INCONCLUSIVE
    assert stats.judge(obj, 59, 1, 0).outcome == stats.INCONCLUSIVE
    assert stats.judge(obj, 93, 1, 1).outcome == stats.PASS
    assert stats.judge(obj, 2, 2, 0).outcome == stats.FAIL  # P(exceed) >= 22 % at 95 %
    assert stats.judge(obj, 5, 0, 0).outcome == stats.INCONCLUSIVE
    loss = stats.Objective(max_loss=0.01)
    assert loss.needed() == 299
    assert stats.judge(loss, 299, 0, 0).outcome == stats.PASS
    assert stats.judge(stats.Objective(strict=True), 59, 1, 0).outcome == stats.FAIL


def test_undecided_probes_are_censored_not_dropped() -> None:
    """A probe whose lag interval straddles the target is over it for the pass bound and within
    it for the fail bound: 58 ok + 1 undecided cannot pass (dropping it would have left 58 ok
    and an "inconclusive" that more probes turn into a pass, the borderline ones never counted),
    and 2 undecided of 2 cannot fail."""
    obj = stats.Objective()
    c = stats.judge(obj, 59, 0, 0, undecided=1)
    assert c.outcome == stats.INCONCLUSIVE and c.exceed_upper == stats.judge(obj, 59, 1, 0).exceed_upper
    assert stats.judge(obj, 2, 0, 0, undecided=2).outcome == stats.INCONCLUSIVE
    assert stats.judge(obj, 2, 2, 0).outcome == stats.FAIL
    assert stats.judge(obj, 93, 0, 0, undecided=1).outcome == stats.PASS  # as one exceedance would
    assert stats.fixed_outcome(obj, 58, 0, 0, 1, undecided=1) == stats.INCONCLUSIVE  # no pass left
    assert stats.fixed_outcome(obj, 59, 0, 0, 0, undecided=1) == stats.INCONCLUSIVE


def test_fixed_outcome_for_early_stop() -> None:
    obj = stats.Objective()
    # 7 of 7 exceeded out of 59 planned: fails whatever the other 52 do; 6 of 6 could still not.
    assert stats.fixed_outcome(obj, 7, 7, 0, 52) == stats.FAIL
    assert stats.fixed_outcome(obj, 6, 6, 0, 53) is None
    assert stats.fixed_outcome(obj, 10, 0, 0, 49) is None
    assert stats.fixed_outcome(obj, 59, 0, 0, 0) == stats.PASS
    # 1 exceeded out of 59 planned: pass impossible, and fail impossible even if 2 more exceed.
    assert stats.fixed_outcome(obj, 57, 1, 0, 2) == stats.INCONCLUSIVE


def test_quantile_names() -> None:
    assert [stats.quantile_name(q) for q in (0.5, 0.95, 0.99, 0.995)] == ["p50", "p95", "p99", "p99.5"]


def test_claim_counts_undecided_probes_in_n_and_says_so() -> None:
    from tracer.export.report import claim_of
    from tracer.spec import HopSpec

    hop = HopSpec(name="posthog_event", target=5, posthog={"event": "lead_captured"})
    c = claim_of(hop, {"ok": 58, "unknown": 3}, undecided=1)
    assert (c["n"], c["within"], c["undecided"], c["ignored"]) == (59, 58, 1, 2)
    assert c["outcome"] == "inconclusive"
    assert "58/59 within target (1 may be either side" in c["statement"]
    assert claim_of(hop, {"ok": 59, "unknown": 2})["outcome"] == "pass"  # blind unknowns: left out
