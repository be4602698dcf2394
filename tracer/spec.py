"""The funnel spec: what to inject, where to look, and how fresh it must be.

Loaded from YAML, ``${ENV_VAR}`` (or ``${ENV_VAR:-default}``) interpolated, validated up front.
Every error names its YAML path, e.g. ``steps.lead.hops[0].posthog.event: field required``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import stat
import types
import typing
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, create_model, field_validator, model_validator

from tracer import plugins, stats
from tracer.durations import MAX_SECONDS
from tracer.gauges import GaugeSpec
from tracer.inject.auth import AuthSpec
from tracer.probe import CAPTURE_REF
from tracer.schema import Duration, Model, Secret
from tracer.synthetic import SyntheticSpec
from tracer.verdict import VERDICTS

# What is registered (entry points, see tracer.plugins) decides which sections exist.
SINK_PLUGINS = plugins.sinks()
INJECTOR_PLUGINS = plugins.injectors()
SINKS = tuple(SINK_PLUGINS)
INJECTORS = tuple(INJECTOR_PLUGINS)
# A step's ``cleanup:`` requests are the ``http`` injector's requests (``InjectorPlugin.request``).
CLEANUP_PLUGIN = INJECTOR_PLUGINS["http"]
assert CLEANUP_PLUGIN.request is not None
CleanupRequest: Any = CLEANUP_PLUGIN.request


def _with_sections(name: str, base: type[Model], sections: dict[str, tuple[type[Model], str]]) -> Any:
    """``base`` plus one optional field per registered plugin (``posthog: PostHogHop | None``...)."""
    fields: dict[str, Any] = {
        key: (model | None, Field(None, description=summary)) for key, (model, summary) in sections.items()
    }
    return create_model(name, __base__=base, __module__=__name__, **fields)


def _chosen(obj: Model, names: tuple[str, ...]) -> list[str]:
    return [s for s in names if getattr(obj, s) is not None]


class ObjectiveSpec(Model):
    """What ``check`` must show for a hop: its ``quantile`` lag within target, with ``confidence``
    (exact binomial order statistics, no distribution assumed); optionally a loss rate bound."""

    quantile: float = Field(0.95, gt=0, lt=1, description="0.95: the hop's p95 is within its target")
    confidence: float = Field(0.95, gt=0, lt=1)
    max_loss: float | None = Field(
        None, gt=0, lt=1, description="also show the loss rate (lost probes) is at most this"
    )

    @model_validator(mode="after")
    def _showable(self) -> ObjectiveSpec:
        try:
            stats.Objective(self.quantile, self.confidence, self.max_loss).needed()
        except ValueError as exc:  # e.g. p99.9999 at 99.9999 %: more probes than any check runs
            need = str(exc).replace(" samples needed", " probes")
            raise ValueError(
                f"no check can show this objective (it needs {need}): lower its quantile or confidence"
            ) from None
        return self


class _Hop(Model):
    """One expected observation of a probe on one sink (the sink sections are added per plugin)."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$", description="the hop's name in reports, spans and metrics"
    )
    target: Duration = Field(gt=0, description="freshness target: lag at or under this is ok")
    deadline: Duration | None = Field(
        None, description="give up after this; default deadline_factor x target"
    )
    after: str | None = Field(
        None, description="measure from this earlier hop's observation, not from injection"
    )
    expect: Literal["present", "absent"] = Field(
        "present", description="absent: a negative probe, seeing it is a breach (e.g. a forged webhook)"
    )
    objective: ObjectiveSpec = Field(
        default_factory=ObjectiveSpec, description="check: the claim to show (default p95 at 95 %)"
    )
    late_grace: Duration = Field(
        0.0, ge=0, description="a probe seen this long after its deadline is late (with its lag), not lost"
    )

    def objective_for(
        self, quantile: float | None = None, confidence: float | None = None
    ) -> stats.Objective:
        """The hop's objective, with the command line's overrides; a negative probe that appears
        fails outright (``strict``)."""
        o = self.objective
        return stats.Objective(
            quantile=quantile if quantile is not None else o.quantile,
            confidence=confidence if confidence is not None else o.confidence,
            max_loss=o.max_loss,
            strict=self.expect == "absent",
        )

    @model_validator(mode="after")
    def _one_sink(self) -> _Hop:
        chosen = _chosen(self, SINKS)
        if len(chosen) != 1:
            raise ValueError(
                f"a hop needs exactly one sink ({', '.join(SINKS)}); found {len(chosen) or 'none'}"
            )
        if self.deadline is not None and self.deadline < self.target:
            raise ValueError("deadline must be at least the target")
        return self

    @cached_property
    def sink(self) -> str:  # cached: collectors ask this for every watch on every poll
        return _chosen(self, SINKS)[0]

    @cached_property
    def sink_spec(self) -> Any:
        return getattr(self, self.sink)


class _Inject(Model):
    """How a probe enters the funnel: exactly one injector section."""

    @model_validator(mode="after")
    def _one(self) -> _Inject:
        if len(_chosen(self, INJECTORS)) != 1:
            raise ValueError(f"inject needs exactly one of: {', '.join(INJECTORS)}")
        return self

    @cached_property
    def kind(self) -> str:
        return _chosen(self, INJECTORS)[0]

    @cached_property
    def config(self) -> Any:
        return getattr(self, self.kind)


HopSpec = _with_sections("HopSpec", _Hop, {n: (p.hop, p.summary) for n, p in SINK_PLUGINS.items()})
InjectSpec = _with_sections(
    "InjectSpec", _Inject, {n: (p.config, p.summary) for n, p in INJECTOR_PLUGINS.items()}
)
CollectorsSpec = _with_sections(
    "CollectorsSpec", Model, {n: (p.config, p.summary) for n, p in SINK_PLUGINS.items()}
)


class StepSpec(Model):
    inject: InjectSpec = Field(description="how each probe enters the funnel: exactly one injector")
    hops: list[HopSpec] = Field(min_length=1, description="where each probe must be seen, and how soon")
    cleanup: list[CleanupRequest] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="requests sent after the probe resolved (check and canary), e.g. DELETE the lead "
        "created, templated with {capture.*}; a failure is reported and never changes a verdict",
    )
    interval: Duration = Field(60.0, ge=0.1, description="canary: one probe every interval (at least 100ms)")
    spacing: Duration = Field(1.0, description="check: pause between a step's samples")
    max_in_flight: int | None = Field(
        None, gt=0, description="canary: cap for this step (default canary.max_in_flight_per_step)"
    )
    concurrency: int | None = Field(
        None, gt=0, description="check: probes in flight at once (default: target / spacing, at most 10)"
    )
    rate: float | None = Field(
        None, gt=0, description="check: at most this many probes started per second (default 1 / spacing)"
    )

    @field_validator("rate")
    @classmethod
    def _rate_bounded(cls, v: float | None) -> float | None:
        if v is not None and v < 1 / MAX_SECONDS:  # e.g. 1e-9: one probe per 31 years
            raise ValueError("at least one probe per 30 days (the longest duration a spec may say)")
        return v

    @model_validator(mode="after")
    def _hop_refs(self) -> StepSpec:
        names = [h.name for h in self.hops]
        if len(set(names)) != len(names):
            raise ValueError("hop names must be unique within a step")
        for h in self.hops:
            if h.after is not None and h.after not in names[: names.index(h.name)]:
                raise ValueError(f"hop '{h.name}': after '{h.after}' must name an earlier hop of this step")
        captured = set(INJECTOR_PLUGINS[self.inject.kind].captures(self.inject.config))
        for where, items in (("hops", self.hops), ("cleanup", self.cleanup)):
            for i, item in enumerate(items):
                used = set(CAPTURE_REF.findall(json.dumps(item.model_dump(mode="json"))))
                if used - captured:
                    raise ValueError(
                        f"{where}[{i}] uses {{capture.{sorted(used - captured)[0]}}}, which the injection does not capture"
                        + (f" (it captures: {', '.join(sorted(captured))})" if captured else ""),
                    )
        return self


# -- the canary: `funnel-tracer canary` ----------------------------------------------------------
class LedgerSpec(Model):
    """Where in-flight probes are recorded: in memory (default), or in Redis so a restarted canary
    resumes them and several instances can share receivers."""

    redis_url: Secret | None = Field(None, description="redis://... ; unset: in memory")
    namespace: str = Field("funnel-tracer", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    instance: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.@-]+$",
        description="this instance's id (default: --instance, else --location, else the host name); "
        "keep it across restarts to resume, and distinct between instances running at once",
    )
    shared_receivers: bool = Field(
        True,
        description="instances share push receivers: sightings of other instances' probes go through Redis "
        "(while Redis is down, push hops are blind rather than possibly lost)",
    )
    max_sightings: int = Field(
        10_000, gt=0, description="bound of each instance's queue of sightings made by others"
    )
    heartbeat: Duration = Field(
        1.0, ge=0.1, description="how often this instance marks itself alive (at least 100ms)"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: Secret | None) -> Secret | None:
        if v is not None and not v.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v


class AlertsSpec(Model):
    """k-of-n alerting per hop, posted to a webhook (Slack-compatible or generic JSON)."""

    webhook_url: Secret | None = Field(None, description="where alerts are posted; unset: no alerts")
    format: Literal["slack", "json"] = "slack"
    k: int = Field(3, gt=0, description="alert when k of the last n probes of a hop are failing")
    n: int = Field(5, gt=0)
    blind_k: int | None = Field(None, gt=0, description="same rule for 'canary blind' (default k)")
    blind_n: int | None = Field(None, gt=0, description="default n")
    failing: list[str] = Field(default_factory=lambda: ["late", "lost", "breach"])
    blind: list[str] = Field(default_factory=lambda: ["unknown", "inject_failed"])
    trace_url: str | None = Field(None, description="link template, e.g. {jaeger_url}/trace/{trace_id}")
    jaeger_url: str | None = Field(None, pattern=r"^https?://")
    timeout: Duration = Field(5.0, ge=0.1)
    retries: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _k_of_n(self) -> AlertsSpec:
        if self.k > self.n:
            raise ValueError("k must not exceed n")
        if (self.blind_k or self.k) > (self.blind_n or self.n):
            raise ValueError("blind_k must not exceed blind_n")
        known = set(VERDICTS)
        for name in ("failing", "blind"):
            bad = [v for v in getattr(self, name) if v not in known]
            if bad:
                raise ValueError(f"{name}: unknown verdict(s) {', '.join(bad)} (have: {', '.join(VERDICTS)})")
        return self


class CanarySpec(Model):
    jitter: float = Field(
        0.2, ge=0, le=1, description="each probe lands within +-jitter/2 x interval of its slot"
    )
    max_in_flight: int | None = Field(
        None, gt=0, description="global cap on probes in flight (default: none)"
    )
    max_in_flight_per_step: int | None = Field(
        None,
        gt=0,
        description="default per-step cap (default: twice what the step's interval and deadlines need)",
    )
    grace: Duration = Field(30.0, ge=0, description="on SIGTERM: wait this long for probes in flight")
    ledger: LedgerSpec = LedgerSpec()
    alerts: AlertsSpec = AlertsSpec()
    synthetic: SyntheticSpec = SyntheticSpec()


class FunnelSpec(Model):
    """A funnel under test: where probes enter (steps), where they are seen (collectors) and how
    fresh they must be (hop targets)."""

    _env_values: tuple[str, ...] = PrivateAttr(default=())  # see parse_spec

    service: str = Field(min_length=1, description="the funnel under test, as reports name it")
    auth: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")], AuthSpec] = Field(
        default_factory=dict,
        description="named credentials for injection, used by a request's `auth: <name>`: "
        "a static token, a login request, OAuth2 client credentials or a token command",
    )
    deadline_factor: float = Field(
        3.0, ge=1.0, description="a hop without deadline gives up at this x target"
    )
    collectors: CollectorsSpec = Field(CollectorsSpec(), description="how to reach each sink the hops use")
    steps: dict[str, StepSpec] = Field(
        min_length=1, description="the funnel's steps by name: one probe kind each"
    )
    canary: CanarySpec = Field(CanarySpec(), description="settings of `funnel-tracer canary`")
    gauges: dict[str, GaugeSpec] = Field(
        default_factory=dict, description="levels, not lags (DLQ depth, failure counts), with thresholds"
    )

    @model_validator(mode="after")
    def _collectors_configured(self) -> FunnelSpec:
        for name, plugin in SINK_PLUGINS.items():
            config = getattr(self.collectors, name)
            for need in plugin.needs(config) if config is not None else ():
                if getattr(self.collectors, need.sink, None) is None:
                    raise _PathError(f"collectors.{name}.{need.field}", need.why)
        for step_name, step in self.steps.items():
            for i, hop in enumerate(step.hops):
                if getattr(self.collectors, hop.sink) is None and not SINK_PLUGINS[hop.sink].implicit:
                    raise _PathError(
                        f"steps.{step_name}.hops[{i}].{hop.sink}",
                        f"this hop needs a 'collectors.{hop.sink}' section",
                    )
        for step_name, step in self.steps.items():
            kind = step.inject.kind
            refs = [
                (f"inject.{kind}.{w}", n) for w, n in INJECTOR_PLUGINS[kind].auth_names(step.inject.config)
            ]
            refs += [(f"cleanup[{i}].auth", r.auth) for i, r in enumerate(step.cleanup) if r.auth]
            for where, name in refs:
                if name not in self.auth:
                    known = ", ".join(sorted(self.auth)) or "none declared"
                    raise _PathError(f"steps.{step_name}.{where}", f"no auth entry '{name}' (auth: {known})")
        domain = self.canary.synthetic.email_domain
        if domain:
            for step_name, step in self.steps.items():
                kind = step.inject.kind
                for where, text in INJECTOR_PLUGINS[kind].body_strings(step.inject.config):
                    if _EMAIL.match(text) and not text.lower().endswith("@" + domain.lower()):
                        raise _PathError(
                            f"steps.{step_name}.inject.{kind}.{where}",
                            f"e-mail address must use the synthetic domain {domain}"
                            " (canary.synthetic.email_domain)",
                        )
        return self

    def probe_duration(self, step_name: str) -> float:
        """Longest a probe of this step can take: injection timeout plus the longest chain of
        hop deadlines (a hop ``after`` another starts when that one is seen)."""
        step = self.steps[step_name]
        chain: dict[str, float] = {}
        for hop in step.hops:
            chain[hop.name] = self.deadline(hop) + (chain[hop.after] if hop.after else 0.0)
        return (
            getattr(step.inject.config, "timeout", 5.0)
            + max(chain.values())
            + max(h.late_grace for h in step.hops)
        )

    def collector_config(self, sink: str) -> Any:
        """A sink's ``collectors.<sink>`` section; an implicit sink (``response``) may omit it."""
        config = getattr(self.collectors, sink)
        if config is None and SINK_PLUGINS[sink].implicit:
            config = SINK_PLUGINS[sink].config()
        return config

    def check_concurrency(self, step_name: str) -> int:
        """check: probes of a step in flight at once. Default: what the spacing keeps busy over
        the longest target, at most 10 (a launch gate is no load test; early stop needs few)."""
        step = self.steps[step_name]
        if step.concurrency is not None:
            return step.concurrency
        interval = self.check_interval(step_name)
        if interval <= 0:  # spacing: 0, no pause between starts: the cap alone bounds them
            return 10
        return max(1, min(10, math.ceil(max(h.target for h in step.hops) / interval)))

    def check_interval(self, step_name: str) -> float:
        """check: least time between two starts of a step's probes (the rate limit)."""
        step = self.steps[step_name]
        return 1.0 / step.rate if step.rate is not None else step.spacing

    def step_cap(self, step_name: str) -> int:
        """Per-step cap on probes in flight: explicit, else twice the steady state."""
        step = self.steps[step_name]
        if step.max_in_flight is not None:
            return step.max_in_flight
        if self.canary.max_in_flight_per_step is not None:
            return self.canary.max_in_flight_per_step
        return max(2, math.ceil(2 * (self.probe_duration(step_name) + 5.0) / step.interval))

    def deadline(self, hop: HopSpec) -> float:
        return hop.deadline if hop.deadline is not None else hop.target * self.deadline_factor


_EMAIL = re.compile(r"^[^@\s{}]+(\{[a-z_]+\}[^@\s{}]*)*@[^@\s]+$")


class _PathError(ValueError):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path, self.message = path, message


class SpecError(Exception):
    """An invalid funnel spec: one line per problem, each ``path: message``. Exit code 2."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "") -> None:
        self.problems = problems
        self.source = source
        head = f"{source}: invalid funnel spec" if source else "invalid funnel spec"
        super().__init__(head + "\n" + "\n".join(f"  {p or '(top)'}: {m}" for p, m in problems))


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, path: str, problems: list[tuple[str, str]], used: dict[str, str]) -> Any:
    """Fill ``${VAR}`` / ``${VAR:-default}``; ``used`` collects each value filled in (value -> name)
    so no error message can echo it."""
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                used[os.environ[name]] = name
                return os.environ[name]
            if default is not None:
                return default
            problems.append((path, f"environment variable {name} is not set"))
            return ""

        return _ENV.sub(sub, node)
    if isinstance(node, dict):
        return {
            k: _interpolate(v, f"{path}.{k}" if path else str(k), problems, used) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", problems, used) for i, v in enumerate(node)]
    return node


def _redact(message: str, used: dict[str, str]) -> str:
    for value in sorted(used, key=len, reverse=True):
        if len(value) >= 3 and value in message:
            message = message.replace(value, "${" + used[value] + "}")
    return message


def _loc_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-") or part in ("str", "float", "int"):
            continue  # pydantic's internal validator names are no YAML path
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(err: dict[str, Any]) -> str:
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _PathError):
        return ctx_err.message
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if err["type"] == "extra_forbidden":
        loc = tuple(err.get("loc") or ())
        names = _field_names_at(loc[:-1])
        near = difflib.get_close_matches(str(loc[-1]), sorted(names), n=1, cutoff=0.6) if loc else []
        if near:
            return f"unknown field (did you mean `{near[0]}`?)"
        return "unknown field (check the spelling; see docs/REFERENCE.md)"
    return msg[:1].lower() + msg[1:]


def _field_names_at(loc: tuple[Any, ...]) -> set[str]:
    """The field names (and aliases) valid at ``loc`` of a FunnelSpec, for "did you mean"."""
    node: Any = FunnelSpec
    for part in loc:
        node = _strip(node)
        if isinstance(part, int) or typing.get_origin(node) is dict:
            args = typing.get_args(node)
            node = args[-1] if args else None
        elif isinstance(node, type) and issubclass(node, Model) and part in node.model_fields:
            node = node.model_fields[part].annotation
        else:
            return set()
    node = _strip(node)
    if not (isinstance(node, type) and issubclass(node, Model)):
        return set()
    return {n for n in node.model_fields} | {f.alias for f in node.model_fields.values() if f.alias}


def _strip(tp: Any) -> Any:
    """``X | None`` -> X, ``list[X]`` stays (indexed next), ``Annotated[X, ...]`` -> X."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = rest[0] if len(rest) == 1 else tp
            if len(rest) != 1:
                return tp
        elif origin is list:
            return tp
        else:
            return tp


def parse_spec(data: Any, source: str = "") -> FunnelSpec:
    if not isinstance(data, dict):
        raise SpecError([("", "the file must be a YAML mapping with 'service' and 'steps'")], source)
    problems: list[tuple[str, str]] = []
    used: dict[str, str] = {}
    data = _interpolate(data, "", problems, used)
    if problems:
        raise SpecError(problems, source)
    try:
        spec = FunnelSpec.model_validate(data)
    except ValidationError as exc:
        out = []
        for err in exc.errors(include_input=False, include_url=False):
            ctx_err = (err.get("ctx") or {}).get("error")
            path = ctx_err.path if isinstance(ctx_err, _PathError) else _loc_path(tuple(err["loc"]))
            out.append((_redact(path, used), _redact(_message(err), used)))
        raise SpecError(out, source) from None
    # Values filled in from the environment may be secrets (a personal key in a body): the funnel's
    # answers are excerpted in reports with each of them replaced (tracer.inject.http).
    spec._env_values = tuple(sorted((v for v in used if len(v) >= 4), key=len, reverse=True))
    return spec


MAX_SPEC_BYTES = 1 << 20  # a funnel spec is a few KiB; this bounds reading /dev/zero or a log by mistake
MAX_VALUES = 100_000  # values after expanding YAML aliases ("billion laughs" expands to 10^9)
MAX_DEPTH = 64


def load_spec(path: str | Path) -> FunnelSpec:
    p = Path(path)
    return parse_spec(_read_yaml(p), str(p))


def _read_yaml(p: Path) -> Any:
    """The file's YAML, or a one-line ``SpecError``: unreadable, not a regular file, too large,
    not UTF-8, not YAML, duplicate keys, nested too deeply, or expanding to too many values."""

    def fail(message: str) -> SpecError:
        return SpecError([("", message)], str(p))

    try:
        if not stat.S_ISREG(p.stat().st_mode):
            raise fail("not a regular file")
        with p.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise fail(f"cannot read file: {exc.strerror}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise fail(f"larger than {MAX_SPEC_BYTES // 1024} KiB: is this the funnel spec?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except _TooBig as exc:
        raise fail(str(exc)) from None
    except RecursionError:
        raise fail(f"nested more than {MAX_DEPTH} levels deep") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise fail(f"not valid YAML ({where}): {getattr(exc, 'problem', None) or exc}") from None
    finally:
        loader.dispose()


class _TooBig(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys: the second one would silently win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}'", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node) -> None:
    """Count values as if every alias were expanded, without expanding anything: each distinct
    node is counted once (memo by identity), so a billion-laughs document is refused at once."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    active: set[int] = set()

    def visit(node: yaml.Node) -> None:
        key = id(node)
        if key in size:
            return
        if key in active:
            raise _TooBig("a YAML alias refers to itself")
        if len(active) >= MAX_DEPTH:
            raise _TooBig(f"nested more than {MAX_DEPTH} levels deep")
        active.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        for child in children:
            visit(child)
        size[key] = 1 + sum(size[id(c)] for c in children)
        depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
        active.discard(key)
        if size[key] > MAX_VALUES:
            raise _TooBig(f"expands to more than {MAX_VALUES:,} values (YAML aliases?)")
        if depth[key] > MAX_DEPTH:
            raise _TooBig(f"nested more than {MAX_DEPTH} levels deep")

    visit(root)
