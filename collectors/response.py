"""Response hops: judge the injection's own answer, for the SLO's API latency and 5xx rows.

Why a sink at all: "health p95 < 200 ms" and "5xx < 0.5 %" are claims about the request the
probe itself makes, with the same statistics as a freshness hop (``tracer.stats``). Modelling
that answer as a sighting on a ``response`` sink reuses the whole pipeline (verdicts, spans,
reports, claims) without the engine naming this sink: it hands every injection of a hop whose
collector ``ObservesInjection`` (``tracer.plugins``), and the hop is settled at once.

A hop is *seen* when the response's status class is one of ``status`` (default: any), at the
moment the response was read, so its lag is the time to response:

* latency rows: ``target: 200ms, objective: {quantile: 0.95}, response: {}``;
* the 5xx row: ``response: {status: [1xx, 2xx, 3xx, 4xx]}`` with ``objective: {max_loss: 0.005}``:
  a 5xx answer is "not seen", i.e. lost, and the loss rate is the 5xx rate.

A timeout is lost for any hop (no answer in time); a connection error is no evidence
(``inject_failed``): the tracer cannot tell a dead API from its own network.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

from tracer import clock
from tracer.inject import Injection
from tracer.plugins import SinkPlugin
from tracer.schema import Model
from tracer.watch import Coverage, Observation, Watch

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class ResponseConfig(Model):
    """Nothing to configure: the injection is the observation (hence ``implicit``)."""


class ResponseHop(Model):
    status: list[str] = Field(
        default_factory=lambda: list(CLASSES), description="status classes that count as an answer"
    )

    @field_validator("status")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in CLASSES]
        if bad or not v:
            raise ValueError(f"status classes must be among {', '.join(CLASSES)}")
        return v


class ResponseCollector:
    sink: ClassVar[str] = "response"

    def __init__(self, config: ResponseConfig) -> None:
        self.config = config
        # Nothing is ever missed for lack of looking: every injection is handed over.
        self.coverage = Coverage(retroactive=True)
        self.seen = 0

    @property
    def error_bar(self) -> float:
        return 0.0  # both ends are read on the tracer's own clock

    async def start(self) -> None:
        self.coverage.looked(clock.now())

    async def close(self) -> None:
        """Nothing held."""

    def watch(self, w: Watch) -> None:
        """Nothing to poll: ``observe_injection`` settles it."""

    def unwatch(self, w: Watch) -> None:
        """Nothing to forget."""

    def observe_injection(self, watch: Watch, injection: Injection) -> bool:
        self.coverage.looked(injection.done_at)
        if injection.status is None:
            if injection.attributes.get("error.type") == "timeout":
                watch.settle(f"no response: {injection.error}")
                return True
            return False  # connection refused, DNS...: no evidence about the endpoint
        self.seen += 1
        klass = f"{injection.status // 100}xx"
        hop: ResponseHop = watch.sink_spec
        if klass in hop.status:
            watch.observe(
                Observation(
                    at=injection.done_at,
                    not_before=injection.done_at,
                    source="response",
                    detail={"status": injection.status},
                )
            )
            watch.settle()
        else:
            watch.settle(f"HTTP {injection.status} ({klass})")
        return True

    def health(self) -> dict[str, Any]:
        return {"up": True, "responses": self.seen}


plugin = SinkPlugin(
    name="response",
    config=ResponseConfig,
    hop=ResponseHop,
    factory=ResponseCollector,
    summary="the injection's own response: time to response and status class (API latency, 5xx rate)",
    implicit=True,
)
