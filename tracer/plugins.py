"""Plugins: the two small protocols every sink and injector implements, and how they are found.

A sink (PostHog, a Redis DLQ, a webhook receiver...) is a ``SinkPlugin``: its ``collectors.<name>``
config model, its hop model (the ``<name>:`` section of a hop) and a factory for its
``Collector``. An injector (``http``, ``redis_dlq``...) is an ``InjectorPlugin``: its config model
(the ``inject.<name>`` section) and a factory for an ``Injector`` bound to one step.

Both are found through Python entry points, the built-in ones too (see ``pyproject.toml``)::

    [project.entry-points."funnel_tracer.collectors"]
    posthog = "collectors.posthog:plugin"

so a third-party distribution that declares an entry point in one of the two groups adds a sink
or an injector that ``validate``, ``check``, ``canary`` and ``--help`` know, without editing the
core. ``tracer.spec`` assembles the schema from what is registered here.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

from tracer.evidence import Evidence
from tracer.inject import CleanupOutcome, Injection
from tracer.probe import Probe
from tracer.schema import Model
from tracer.watch import Coverage, Watch

COLLECTORS_GROUP = "funnel_tracer.collectors"
INJECTORS_GROUP = "funnel_tracer.injectors"


class Collector(Protocol):
    """Watches one sink. Told which hops to look for (``watch``), it finds them on its sink and
    reports a sighting with ``Watch.observe``; its ``Coverage`` says when it could see, so a
    verdict never calls a blind window ``late`` or ``lost``. Runs on the engine's asyncio loop."""

    sink: ClassVar[str]
    coverage: Coverage

    @property
    def error_bar(self) -> float:
        """Typical uncertainty of one sighting in seconds (a poller's effective interval)."""
        ...

    async def start(self) -> None:
        """Connect / bind / begin polling. Call ``coverage.looked(now)`` once able to see."""
        ...

    async def close(self) -> None: ...

    def watch(self, w: Watch) -> None:
        """Start looking for ``w`` (registered just before injection)."""
        ...

    def unwatch(self, w: Watch) -> None: ...

    def health(self) -> dict[str, Any]:
        """``{"up": bool, ...}`` for /healthz, metrics and reports. No secrets."""
        ...


@runtime_checkable
class PushReceiver(Protocol):
    """Optional, for push collectors (webhook): hand every accepted body on ``path`` to
    ``on_body(body, received)`` as well, after the collector's own matching. PostHog's realtime
    destination uses it, and the canary passes sightings of probes owned by *another* instance
    to the shared ledger (``tracer.ledger``), so instances behind one load balancer each match
    their probes once."""

    def route(self, path: str, on_body: Callable[[Any, float], None]) -> None: ...


@runtime_checkable
class Connects(Protocol):
    """Optional: a collector that works through another one (PostHog push through the webhook
    receiver) is handed every started collector once, after all have started."""

    def connect(self, others: Mapping[str, Collector]) -> None: ...


@runtime_checkable
class Explains(Protocol):
    """Optional: after a verdict that is not ``ok``, say what the sink held instead. ``base``
    already holds what was searched for and the blind windows; fill in near misses, what was
    found, a summary clause and a hint. Called once per such hop; a sink whose lookups cost
    quota must batch them (PostHog: one extra query per poll cycle, not one per probe)."""

    async def explain(self, w: Watch, start: float, end: float, base: Evidence) -> Evidence: ...


@runtime_checkable
class ObservesInjection(Protocol):
    """Optional: a collector that judges the injection itself (its response status and time,
    e.g. ``response``) is handed each injection of the hops it watches, right after it returns,
    failed ones included. It returns True when the injection is evidence for ``watch`` (the
    engine then judges the hop, even for a failed injection) and may ``watch.settle`` it: nothing
    more can be seen, so the engine need not wait for the deadline."""

    def observe_injection(self, watch: Watch, injection: Injection) -> bool: ...


@dataclass(frozen=True)
class Need:
    """A sink's config asks for another sink: ``field`` (within its section) needs ``sink``."""

    field: str
    sink: str
    why: str


@dataclass(frozen=True)
class Finding:
    """One preflight check (``funnel-tracer doctor``): what was checked, whether it is fine, what
    was found, and how to fix it. ``blocks``: the sink cannot measure at all (a wrong key), so its
    hops are ``unknown`` from the start instead of waiting for a deadline."""

    check: str
    ok: bool
    detail: str = ""
    fix: str | None = None
    blocks: bool = False


# (config, the hop sections that use this sink) -> findings; never injects anything
SinkPreflight = Callable[[Any, list[Any]], Awaitable[list[Finding]]]
# (config, the step's name) -> findings
InjectorPreflight = Callable[[Any, str], Awaitable[list[Finding]]]


async def _nothing_to_check(config: Any, _: Any) -> list[Finding]:
    return []


@dataclass(frozen=True)
class SinkPlugin:
    name: str  # the key under ``collectors:`` and inside a hop
    config: type[Model]
    hop: type[Model]
    factory: Callable[[Any], Collector]  # config -> collector
    summary: str = ""  # one line for --help
    needs: Callable[[Any], Iterable[Need]] = field(default=lambda config: ())
    preflight: SinkPreflight = _nothing_to_check
    # The spec does not ask for a ``collectors.<name>`` section (every field of ``config`` has a
    # default): e.g. ``response``, which watches the injection itself.
    implicit: bool = False


class Injector(Protocol):
    """Sends one probe for one step. Built once per step at engine start (so per-step work, such
    as applying the synthetic markers to a template, is done once), closed at engine close."""

    timeout: float  # longest one ``send`` may take: bounds a probe's duration

    async def send(self, probe: Probe) -> Injection: ...

    async def close(self) -> None: ...


@runtime_checkable
class Cleans(Protocol):
    """Optional: an injector that leaves something behind (a synthetic DLQ entry) removes it
    once the probe's hops resolved. Failures are outcomes, never exceptions, and never change a
    verdict."""

    async def cleanup(self, probe: Probe) -> list[CleanupOutcome]: ...


@dataclass(frozen=True)
class InjectContext:
    """What the engine shares with every injector."""

    http: Any  # httpx.AsyncClient, shared connection pool
    synthetic: Any  # tracer.synthetic.SyntheticSpec: the markers every injection carries
    # name -> tracer.inject.auth.Authenticator: the spec's ``auth:`` map, one token cache each
    auth: Mapping[str, Any] = field(default_factory=dict)
    # Values the spec took from the environment (possible secrets): never echoed in a report,
    # e.g. when the funnel's refusal quotes the body it was sent.
    redact: tuple[str, ...] = ()


@dataclass(frozen=True)
class InjectorPlugin:
    name: str  # the key under a step's ``inject:``
    config: type[Model]
    factory: Callable[[Any, InjectContext], Injector]
    summary: str = ""
    # Every string an injection puts in a body, as (path within the section, text): the spec
    # checks e-mail addresses against ``canary.synthetic.email_domain``.
    body_strings: Callable[[Any], Iterable[tuple[str, str]]] = field(default=lambda config: ())
    preflight: InjectorPreflight = _nothing_to_check
    # Names an injection captures (``{capture.<name>}`` in hop matchers and cleanup must be one).
    captures: Callable[[Any], Iterable[str]] = field(default=lambda config: ())
    # Every ``auth`` reference, as (path within the section, name): checked against ``auth:``.
    auth_names: Callable[[Any], Iterable[tuple[str, str]]] = field(default=lambda config: ())
    # An injector that can also send standalone requests (``http``): the model of one request
    # and how to send a list of them for a probe. A step's ``cleanup:`` list is made of these.
    request: type[Model] | None = None
    run_requests: Callable[[list[Any], Probe, InjectContext], Awaitable[list[CleanupOutcome]]] | None = None


class PluginError(Exception):
    """A registered entry point is broken (cannot be imported, or is not a plugin)."""


def _load(group: str, kind: type) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must name itself
            raise PluginError(f"{group} entry point '{ep.name}' ({ep.value}) failed to load: {exc}") from exc
        if not isinstance(plugin, kind):
            raise PluginError(f"{group} entry point '{ep.name}' ({ep.value}) is not a {kind.__name__}")
        if plugin.name != ep.name:
            raise PluginError(f"{group} entry point '{ep.name}' names a plugin called '{plugin.name}'")
        if ep.name in found:
            continue  # the same distribution seen twice on sys.path (e.g. an editable install)
        found[ep.name] = plugin
    if not found:
        raise PluginError(
            f"no {group} entry points: funnel-tracer is not installed (run `pip install .` in its checkout)"
        )
    return found


@functools.cache
def sinks() -> dict[str, SinkPlugin]:
    """Every registered sink, by name (sorted)."""
    return _load(COLLECTORS_GROUP, SinkPlugin)


@functools.cache
def injectors() -> dict[str, InjectorPlugin]:
    """Every registered injector, by name (sorted)."""
    return _load(INJECTORS_GROUP, InjectorPlugin)
