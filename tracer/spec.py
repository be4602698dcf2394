"""The funnel spec: what to inject, where to look, and how fresh it must be.

Loaded from YAML, ``${ENV_VAR}`` (or ``${ENV_VAR:-default}``) interpolated, validated up front.
Every error names its YAML path, e.g. ``steps.lead.hops[0].posthog.event: field required``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from collectors.posthog import PostHogConfig, PostHogHop
from collectors.redis_dlq import RedisDlqConfig, RedisDlqHop
from collectors.smtp import SmtpConfig, SmtpHop
from collectors.webhook import WebhookConfig, WebhookHop
from tracer.inject.http import HttpInject
from tracer.inject.redis_dlq import DlqInject
from tracer.schema import Duration, Model

SINKS = ("posthog", "redis_dlq", "webhook", "smtp")
INJECTORS = ("http", "redis_dlq")


class HopSpec(Model):
    """One expected observation of a probe on one sink."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    target: Duration = Field(description="freshness target: lag at or under this is ok")
    deadline: Duration | None = Field(None, description="give up after this; default deadline_factor x target")
    after: str | None = Field(None, description="measure from this earlier hop's observation, not from injection")
    expect: Literal["present", "absent"] = "present"
    posthog: PostHogHop | None = None
    redis_dlq: RedisDlqHop | None = None
    webhook: WebhookHop | None = None
    smtp: SmtpHop | None = None

    @model_validator(mode="after")
    def _one_sink(self) -> HopSpec:
        chosen = [s for s in SINKS if getattr(self, s) is not None]
        if len(chosen) != 1:
            raise ValueError(f"a hop needs exactly one sink ({', '.join(SINKS)}); found {len(chosen) or 'none'}")
        if self.deadline is not None and self.deadline < self.target:
            raise ValueError("deadline must be at least the target")
        return self

    @property
    def sink(self) -> str:
        return next(s for s in SINKS if getattr(self, s) is not None)

    @property
    def sink_spec(self) -> Any:
        return getattr(self, self.sink)


class InjectSpec(Model):
    http: HttpInject | None = None
    redis_dlq: DlqInject | None = None

    @model_validator(mode="after")
    def _one(self) -> InjectSpec:
        chosen = [s for s in INJECTORS if getattr(self, s) is not None]
        if len(chosen) != 1:
            raise ValueError(f"inject needs exactly one of: {', '.join(INJECTORS)}")
        return self

    @property
    def kind(self) -> str:
        return next(s for s in INJECTORS if getattr(self, s) is not None)


class StepSpec(Model):
    inject: InjectSpec
    hops: list[HopSpec] = Field(min_length=1)
    interval: Duration = Field(60.0, gt=0, description="canary: one probe every interval")
    spacing: Duration = Field(1.0, description="check: pause between a step's samples")

    @model_validator(mode="after")
    def _hop_refs(self) -> StepSpec:
        names = [h.name for h in self.hops]
        if len(set(names)) != len(names):
            raise ValueError("hop names must be unique within a step")
        for h in self.hops:
            if h.after is not None and h.after not in names[: names.index(h.name)]:
                raise ValueError(f"hop '{h.name}': after '{h.after}' must name an earlier hop of this step")
        return self


class CollectorsSpec(Model):
    posthog: PostHogConfig | None = None
    redis_dlq: RedisDlqConfig | None = None
    webhook: WebhookConfig | None = None
    smtp: SmtpConfig | None = None


class FunnelSpec(Model):
    service: str = Field(min_length=1, description="the funnel under test, as reports name it")
    deadline_factor: float = Field(3.0, ge=1.0)
    collectors: CollectorsSpec = CollectorsSpec()
    steps: dict[str, StepSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _collectors_configured(self) -> FunnelSpec:
        for step_name, step in self.steps.items():
            for i, hop in enumerate(step.hops):
                if getattr(self.collectors, hop.sink) is None:
                    raise _PathError(
                        f"steps.{step_name}.hops[{i}].{hop.sink}",
                        f"this hop needs a 'collectors.{hop.sink}' section",
                    )
        return self

    def deadline(self, hop: HopSpec) -> float:
        return hop.deadline if hop.deadline is not None else hop.target * self.deadline_factor


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


def _interpolate(node: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            problems.append((path, f"environment variable {name} is not set"))
            return ""

        return _ENV.sub(sub, node)
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", problems) for i, v in enumerate(node)]
    return node


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
        return "unknown field (check the spelling; see examples/)"
    return msg[:1].lower() + msg[1:]


def parse_spec(data: Any, source: str = "") -> FunnelSpec:
    if not isinstance(data, dict):
        raise SpecError([("", "the file must be a YAML mapping with 'service' and 'steps'")], source)
    problems: list[tuple[str, str]] = []
    data = _interpolate(data, "", problems)
    if problems:
        raise SpecError(problems, source)
    try:
        return FunnelSpec.model_validate(data)
    except ValidationError as exc:
        out = []
        for err in exc.errors(include_input=False, include_url=False):
            ctx_err = (err.get("ctx") or {}).get("error")
            path = ctx_err.path if isinstance(ctx_err, _PathError) else _loc_path(tuple(err["loc"]))
            out.append((path, _message(err)))
        raise SpecError(out, source) from None


def load_spec(path: str | Path) -> FunnelSpec:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([("", f"cannot read file: {exc.strerror}")], str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise SpecError([("", f"not valid YAML ({where}): {getattr(exc, 'problem', exc)}")], str(p)) from None
    return parse_spec(data, str(p))
