"""A collector's background task never dies silently: it is restarted, counted, logged once per
kind, and the collector is blind (so hops are unknown, never lost) until it looks again."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tracer import clock
from tracer.supervise import Supervisor
from tracer.watch import Coverage


def test_a_crashing_loop_is_restarted_counted_and_blind(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[Supervisor, Coverage, list[str]]:
        coverage = Coverage(retroactive=True)
        coverage.looked(clock.now())
        sup = Supervisor("test-poller", coverage, backoff=0.01)
        runs: list[str] = []
        recovered = asyncio.Event()

        async def loop() -> None:
            runs.append("run")
            if len(runs) <= 3:
                raise TypeError("'NoneType' object is not subscriptable")  # e.g. a body of null
            coverage.looked(clock.now())
            recovered.set()
            await asyncio.sleep(3600)

        task = sup.start(loop)
        await asyncio.wait_for(recovered.wait(), 5)
        assert not task.done()  # alive after three crashes
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return sup, coverage, runs

    with caplog.at_level(logging.ERROR, logger="tracer.supervise"):
        sup, coverage, runs = asyncio.run(main())
    assert sup.crashes == 3 and len(runs) == 4
    (window,) = coverage.blind_windows(-1e9, clock.now())
    assert window[2] == "internal error (TypeError)"
    assert not coverage.blind_now  # the look after the restart closed the window
    assert len([r for r in caplog.records if "unexpected TypeError" in r.getMessage()]) == 1
