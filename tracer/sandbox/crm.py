"""A CRM stand-in: captured leads become contacts, searchable the HubSpot way.

``POST /crm/v3/objects/contacts/search`` with HubSpot's body (``filterGroups`` of ``filters``
with ``EQ``, ``IN`` or ``CONTAINS_TOKEN``; ``properties``; ``limit``; ``after``) and a private-app
token (``Authorization: Bearer pat-...``). A contact appears ``delay`` seconds after its lead
was captured (``tracer/sandbox/funnel.py``), which is the ground truth the ``http_json``
collector's tests measure; ``fault`` forces an HTTP status, ``retry_after`` a 429.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


@dataclass
class CrmState:
    token: str = "pat-sandbox-crm"
    delay: float = 0.0  # seconds from lead capture to the contact being searchable
    fault: int | None = None
    retry_after: float | None = None
    contacts: list[dict[str, Any]] = field(default_factory=list)
    searches: int = 0

    def add(self, properties: dict[str, Any]) -> dict[str, Any]:
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        props = {k: None if v is None else str(v) for k, v in properties.items()}
        props.update(createdate=now, lastmodifieddate=now, hs_object_id=str(len(self.contacts) + 1))
        contact = {
            "id": props["hs_object_id"],
            "properties": props,
            "createdAt": now,
            "updatedAt": now,
            "archived": False,
        }
        self.contacts.append(contact)
        return contact


def capture_lead(
    crm: CrmState, tasks: set[asyncio.Task[None]], lead: dict[str, Any], props: dict[str, Any]
) -> None:
    """The funnel's CRM sync: the lead becomes a contact after ``crm.delay``."""
    name = str(lead.get("name") or "")
    properties = {
        "email": lead["email"],
        "firstname": name.split(" ")[0] if name else None,
        "lead_id": props.get("lead_id"),
        "lead_source": lead.get("source"),
        "canary_trace_id": props.get("canary_trace_id"),
    }

    async def later() -> None:
        await asyncio.sleep(crm.delay)
        crm.add(properties)

    task = asyncio.get_running_loop().create_task(later())
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _matches(contact: dict[str, Any], f: dict[str, Any]) -> bool:
    value = contact["properties"].get(str(f.get("propertyName")))
    op = str(f.get("operator", "EQ")).upper()
    if op == "EQ":
        return value is not None and value == str(f.get("value"))
    if op == "IN":
        return value is not None and value in [str(v) for v in f.get("values") or []]
    if op == "CONTAINS_TOKEN":
        return value is not None and str(f.get("value", "")).strip("*").lower() in value.lower()
    if op == "HAS_PROPERTY":
        return value is not None
    raise ValueError(op)


def crm_routes(crm: CrmState) -> list[Route]:
    async def search(request: Request) -> JSONResponse:
        crm.searches += 1
        if crm.fault is not None:
            return JSONResponse({"status": "error", "message": "internal error"}, status_code=crm.fault)
        if crm.retry_after is not None:
            return JSONResponse(
                {
                    "status": "error",
                    "message": "You have reached your secondly limit.",
                    "category": "RATE_LIMITS",
                },
                status_code=429,
                headers={"Retry-After": f"{crm.retry_after:g}"},
            )
        if request.headers.get("authorization") != f"Bearer {crm.token}":
            return JSONResponse({"status": "error", "category": "INVALID_AUTHENTICATION"}, status_code=401)
        try:
            body = await request.json()
            groups = body.get("filterGroups") or []
            # HubSpot caps a page at 200; the stand-in allows 2,000 so one answer can carry a flood.
            limit = min(2000, max(1, int(body.get("limit") or 10)))
            after = int(body.get("after") or 0)
            wanted = body.get("properties") or ["email", "createdate", "lastmodifieddate", "hs_object_id"]
            hits = [
                c for c in crm.contacts
                if not groups or any(all(_matches(c, f) for f in g.get("filters") or []) for g in groups)
            ]  # fmt: skip
        except (ValueError, AttributeError, TypeError):
            return JSONResponse({"status": "error", "category": "VALIDATION_ERROR"}, status_code=400)
        page = hits[after : after + limit]
        results = [{**c, "properties": {k: c["properties"].get(k) for k in wanted}} for c in page]
        out: dict[str, Any] = {"total": len(hits), "results": results}
        if after + limit < len(hits):
            out["paging"] = {"next": {"after": str(after + limit)}}
        return JSONResponse(out)

    return [Route("/crm/v3/objects/contacts/search", search, methods=["POST"])]
