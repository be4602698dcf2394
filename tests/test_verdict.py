"""The verdict rules, including the one that matters most: never late/lost for a blind window."""

from __future__ import annotations

from tracer.verdict import judge_absent, judge_present
from tracer.watch import Coverage, Observation


def poller(*looks: float, fail_at: float | None = None, recover_at: float | None = None) -> Coverage:
    c = Coverage(retroactive=True)
    for t in looks:
        c.looked(t)
    if fail_at is not None:
        c.failed(fail_at)
    if recover_at is not None:
        c.looked(recover_at)
    return c


def test_ok_when_upper_bound_within_target() -> None:
    obs = Observation(at=4.0, not_before=3.0, source="poll")
    assert judge_present(obs, 0.0, 5.0, 15.0, poller(0.0, 3.0, 4.0), certified=True) == ("ok", None)


def test_unknown_when_normal_cadence_straddles_target() -> None:
    """Seen at 5.5 s, not there at 4.5 s: the true lag may be 4.6 s (ok) or 5.4 s (late)."""
    obs = Observation(at=5.5, not_before=4.5, source="poll")
    verdict, reason = judge_present(obs, 0.0, 5.0, 15.0, poller(0.0, 4.5, 5.5), certified=True)
    assert verdict == "unknown"
    assert reason == (
        "seen 5.50s after start, between two looks: the true lag is between 4.50s and 5.50s, "
        "around the 5s target; look more often to tell"
    )


def test_late_when_the_look_before_was_already_past_target() -> None:
    obs = Observation(at=6.5, not_before=5.5, source="poll")
    verdict, reason = judge_present(obs, 0.0, 5.0, 15.0, poller(0.0, 5.5, 6.5), certified=True)
    assert verdict == "late"
    assert reason == "seen 6.50s after start (not before 5.50s), over the 5s target"


def test_unknown_when_blind_window_straddles_target() -> None:
    # Looks failed from 2 s to 9 s: the event may have arrived at 2.1 s (ok) or 8.9 s (late).
    cov = poller(0.0, 2.0, fail_at=3.0, recover_at=9.0)
    obs = Observation(at=9.2, not_before=9.0, source="poll")
    verdict, reason = judge_present(obs, 0.0, 5.0, 15.0, cov, certified=True)
    assert verdict == "unknown" and "blind" in reason


def test_late_even_after_blindness_when_certainly_past_target() -> None:
    cov = poller(0.0, 6.0, fail_at=7.0, recover_at=9.0)  # blind only after the target passed
    obs = Observation(at=9.2, not_before=9.0, source="poll")
    verdict, _ = judge_present(obs, 0.0, 5.0, 15.0, cov, certified=True)
    assert verdict == "late"


def test_lost_needs_a_look_covering_the_deadline() -> None:
    assert judge_present(None, 0.0, 5.0, 15.0, poller(0.0, 16.0), certified=True)[0] == "lost"
    assert judge_present(None, 0.0, 5.0, 15.0, poller(0.0, 10.0), certified=False)[0] == "unknown"


def test_push_receiver_blind_mid_window_cannot_say_lost() -> None:
    cov = Coverage(retroactive=False)
    cov.looked(0.0)
    cov.failed(3.0)
    cov.looked(8.0)
    cov.looked(20.0)
    assert judge_present(None, 0.0, 5.0, 15.0, cov, certified=True)[0] == "unknown"
    # A retroactive poller blind mid-window still finds what arrived, so absence is proof.
    assert (
        judge_present(None, 0.0, 5.0, 15.0, poller(0.0, 3.0, fail_at=4.0, recover_at=20.0), True)[0] == "lost"
    )


def test_observed_after_deadline_is_lost_only_when_certainly_after() -> None:
    obs = Observation(at=17.0, not_before=16.5, source="poll")
    assert judge_present(obs, 0.0, 5.0, 15.0, poller(0.0, 16.5, 17.0), True)[0] == "lost"
    obs2 = Observation(at=17.0, not_before=14.0, source="poll")
    assert judge_present(obs2, 0.0, 5.0, 15.0, poller(0.0, 14.0, 17.0), True)[0] == "late"


def test_negative_probe() -> None:
    assert judge_absent(None, 0.0, 10.0, poller(0.0, 11.0), certified=True) == ("ok", None)
    assert judge_absent(Observation(at=2.0, not_before=2.0), 0.0, 10.0, poller(0.0), True)[0] == "breach"
    assert judge_absent(None, 0.0, 10.0, poller(0.0, 5.0), certified=False)[0] == "unknown"
