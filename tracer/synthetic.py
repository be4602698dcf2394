"""Synthetic hygiene: mark everything the tracer injects so the funnel, PostHog and revenue
reports can tell canary traffic from customers (``canary.synthetic`` in the spec).

- a header on every HTTP injection (default ``X-Synthetic: true``), unless the step sets it;
- optionally a property in every JSON body (a dotted path such as ``metadata.synthetic``; in a
  form body, its last segment);
- optionally an e-mail domain every address in an inject body must use (checked at load, see
  ``tracer.spec``);
- when an injection *is* a PostHog capture (the tracer sending events to PostHog itself),
  ``$process_person_profile: false`` on each event, so no person profile is created for it.

The HTTP injector applies the marking (``tracer.inject.http``) to its request template once,
before rendering and signing, so a signed webhook is signed over the marked body. This module
sits below the injectors: it knows the markers, not the requests.
"""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field

from tracer.schema import Model

# PostHog's capture endpoints (see /work/shared/reference/posthog.md); trailing slash optional.
POSTHOG_CAPTURE_PATHS = {"/batch", "/i/v0/e", "/e", "/capture", "/track", "/i/v0/ai/batch"}


class SyntheticSpec(Model):
    """How everything the tracer injects is marked as synthetic, so the funnel, PostHog and
    revenue reports can filter it out. Applies to ``check`` and ``canary`` alike."""

    header: str | None = Field("X-Synthetic", description="header added to every HTTP injection (null: none)")
    header_value: str = "true"
    property: str | None = Field(
        None,
        pattern=r"^[A-Za-z_$][A-Za-z0-9_$]*(\.[A-Za-z_$][A-Za-z0-9_$]*)*$",
        description="dotted path set in every JSON body (form: last segment), e.g. metadata.synthetic",
    )
    property_value: bool | int | str = True
    email_domain: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9.-]+\.[A-Za-z]{2,}$",
        description="every e-mail address in an inject body must use this domain (checked at load)",
    )
    posthog_personless: bool = Field(
        True,
        description="set $process_person_profile: false on events the tracer captures into PostHog itself",
    )


def header(marker: SyntheticSpec, present: dict[str, str]) -> dict[str, str]:
    """The marker header for one request, unless the step already sends that header."""
    if not marker.header or any(k.lower() == marker.header.lower() for k in present):
        return {}
    return {marker.header: marker.header_value}


def is_posthog_capture(url: str) -> bool:
    path = urlsplit(url.replace("{", "").replace("}", "")).path.rstrip("/") or "/"
    return path in POSTHOG_CAPTURE_PATHS


def mark_body(
    marker: SyntheticSpec, url: str, body: Any, form: dict[str, str] | None
) -> tuple[Any, dict[str, str] | None] | None:
    """``(json body, form)`` with the synthetic property (and PostHog personless flag) set, or
    None when nothing changed.

    A PostHog capture body (the tracer sending events itself) is marked per event: the property's
    last segment becomes an event property, next to ``$process_person_profile: false``."""
    changed = False
    if isinstance(body, dict):
        body = copy.deepcopy(body)
        if is_posthog_capture(url):
            events = body["batch"] if isinstance(body.get("batch"), list) else [body]
            for ev in events:
                if not isinstance(ev, dict) or "event" not in ev:
                    continue
                if marker.posthog_personless:
                    changed |= _set_path(ev, ["properties", "$process_person_profile"], False)
                if marker.property:
                    changed |= _set_path(
                        ev, ["properties", marker.property.split(".")[-1]], marker.property_value
                    )
        elif marker.property:
            changed |= _set_path(body, marker.property.split("."), marker.property_value)
    if marker.property and form is not None:
        key = marker.property.split(".")[-1]
        if key not in form:
            value = marker.property_value
            form = {**form, key: str(value).lower() if isinstance(value, bool) else str(value)}
            changed = True
    return (body, form) if changed else None


def _set_path(obj: dict[str, Any], path: list[str], value: Any) -> bool:
    """Set ``obj[a][b]... = value`` unless already present; False when nothing changed (or a
    non-object is in the way: the funnel's own shape wins over the marker)."""
    node = obj
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            return False
        node = nxt
    if path[-1] in node:
        return False
    node[path[-1]] = value
    return True
