"""Receipts: what reached a push receiver (webhook, SMTP), kept briefly so a hop that is not ``ok``
can say what arrived instead, and the receivers' shared preflight checks.

A push receiver cannot look back: once a delivery is answered it is gone. So each receiver keeps
a small ring of its last deliveries (``Receipts``): when, where to (the hop path, or the
recipients), whether it was rejected and why, and which *watched* trace ids its body carried. No
bodies, no secrets (a wrong secret segment or token is dropped before it is recorded), and at
most ``RING`` entries whatever the traffic: a flood costs a fixed amount of memory. When the ring
has turned over inside a hop's window the evidence says "at least".

``explain`` turns the receipts of a hop's window into ``Evidence``: near misses are the
deliveries on the hop's path (or to its recipient) that were rejected or did not carry the trace
id, plus deliveries elsewhere that did carry it.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from tracer.evidence import Evidence
from tracer.plugins import Finding

RING = 2000  # deliveries remembered per receiver
MAX_IDS = 8  # watched trace ids remembered per delivery
AUTH = "unauthenticated"  # the prefix of every authentication rejection's label


@dataclass(frozen=True, slots=True)
class Receipt:
    at: float  # clock.now() when answered
    where: tuple[str, ...]  # hop path or recipients, secret-free; () when not known
    rejected: str | None = None  # None: accepted; else a label, "unauthenticated: wrong or missing secret"
    ids: frozenset[str] = frozenset()  # watched trace ids the body carried
    matched: frozenset[str] = frozenset()  # of those, the ones that made a sighting here


class Receipts:
    """The last ``maxlen`` deliveries, oldest first (appended in clock order)."""

    def __init__(self, maxlen: int = RING) -> None:
        self._ring: deque[Receipt] = deque(maxlen=maxlen)

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def maxlen(self) -> int:
        return self._ring.maxlen or 0

    def add(
        self,
        at: float,
        where: Iterable[str] = (),
        rejected: str | None = None,
        ids: Iterable[str] = (),
        matched: Iterable[str] = (),
    ) -> None:
        kept = frozenset(list(ids)[:MAX_IDS])
        self._ring.append(Receipt(at, tuple(w[:120] for w in where), rejected, kept, frozenset(matched)))

    def window(self, start: float, end: float) -> tuple[list[Receipt], bool]:
        """The receipts in ``[start, end]``, and whether older ones of the window may be gone."""
        ring = list(self._ring)  # a copy: explain may run while deliveries arrive
        truncated = len(ring) == self.maxlen and bool(ring) and ring[0].at > start
        return [r for r in ring if start <= r.at <= end], truncated


@dataclass(frozen=True)
class Wording:
    """How one receiver names things in the evidence sentence."""

    noun: tuple[str, str]  # ("delivery", "deliveries")
    field: str  # the hop field that picks the place: "path", "to"
    outside: str  # what a delivery with the id but no sighting means: "outside json_path"
    auth_hint: str  # when every rejection was authentication


def explain(
    base: Evidence,
    receipts: Receipts,
    trace_id: str,
    start: float,
    end: float,
    place: str,
    on_place: Callable[[Receipt], bool],
    wording: Wording,
) -> Evidence:
    """What reached ``place`` (the hop's path or recipient) between ``start`` and ``end``."""
    window, truncated = receipts.window(start, end)
    on = [r for r in window if on_place(r)]
    others = [r for r in window if not on_place(r)]
    rejected = Counter(r.rejected for r in on if r.rejected)
    accepted = [r for r in on if not r.rejected]
    matched = sum(1 for r in accepted if trace_id in r.matched)
    outside = sum(1 for r in accepted if trace_id in r.ids and trace_id not in r.matched)
    without = len(accepted) - matched - outside
    elsewhere = Counter(w for r in others if not r.rejected and trace_id in r.ids for w in r.where[:1])
    other_places = Counter(w for r in others for w in r.where[:1])
    turned_away = sum(1 for r in others if not r.where)
    one, many = wording.noun

    def count(n: int) -> str:
        return f"{'at least ' if truncated else ''}{n} {one if n == 1 else many}"

    if on:
        parts = []
        if rejected:
            labels = ", ".join(f"{n} {label}" for label, n in rejected.most_common())
            parts.append(f"{sum(rejected.values())} rejected ({labels})")
        if without:
            parts.append(f"{without} without the trace id")
        if outside:
            parts.append(f"{outside} with the trace id {wording.outside}")
        if matched:
            parts.append(f"{matched} with the sighting")
        summary = f"{count(len(on))} reached {place} in the window: " + ", ".join(parts)
    else:
        summary = f"no {one} reached {place} in the window"
        if other_places:
            top = ", ".join(w for w, _ in other_places.most_common(3))
            summary += f" ({count(sum(other_places.values()))} went elsewhere: {top})"
    if elsewhere:
        summary += f"; the trace id reached {', '.join(w for w, _ in elsewhere.most_common(3))} instead"
    if turned_away:
        summary += f"; {turned_away} connection(s) were turned away before their request was read"

    hint = base.hint
    if hint is None:
        if elsewhere:
            hint = f"the funnel sends this notification elsewhere: check the hop's {wording.field}"
        elif outside:
            hint = f"the trace id arrived {wording.outside}: check the hop's section"
        elif rejected and not accepted and all(label.startswith(AUTH) for label in rejected):
            hint = wording.auth_hint
        elif not on and other_places:
            hint = f"deliveries arrived, but not at {place}: check the hop's {wording.field}"

    found: dict[str, object] = {
        "received": len(on),
        "rejected": dict(rejected),
        "accepted_without_trace_id": without,
    }
    if outside:
        found["trace_id_outside"] = outside
    if elsewhere:
        found["trace_id_elsewhere"] = dict(elsewhere.most_common(5))
    if other_places:
        found["elsewhere"] = dict(other_places.most_common(5))
    if turned_away:
        found["turned_away"] = turned_away
    if truncated:
        found["truncated"] = True  # the ring turned over: counts are lower bounds
    return replace(
        base,
        near_misses=len(on) - matched + sum(elsewhere.values()),
        found={**base.found, **found},
        summary=summary,
        hint=hint,
    )


# -- preflight: the receivers' shared checks -------------------------------------------------
_HELD: set[tuple[str, int]] = set()  # (host, port) a receiver of this process listens on


def hold(host: str, port: int) -> None:
    """A receiver of this process listens on ``host:port`` (the canary's preflight runs after its
    receivers started: their own port is not "in use by another process")."""
    _HELD.add((host, port))


def release(host: str, port: int) -> None:
    _HELD.discard((host, port))


def port_finding(where: str, host: str, port: int) -> Finding:
    """Can the receiver bind ``host:port``? Tried for real (bind, listen, close, with the
    receivers' own SO_REUSEADDR so a TIME_WAIT from a previous run is not a false alarm).

    The check runs before the receivers start in ``doctor`` and ``check``; in the canary it runs
    after, so a port that one of *this process's* receivers holds (``hold``) is fine, and only
    another process's is a problem."""
    check = f"{where}: port {port} on {host} can be bound"
    if port == 0:
        return Finding(check, True, "port 0: an ephemeral port is picked at start")
    if (host, port) in _HELD:
        return Finding(check, True, "held by this process's receiver")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return Finding(
                check,
                False,
                "already in use",
                fix=f"another process holds port {port}: stop it, or set {where}.port to a free port",
                blocks=True,
            )
        return Finding(
            check,
            False,
            exc.strerror or type(exc).__name__,
            fix=f"check {where}.host and {where}.port (ports below 1024 need privileges)",
            blocks=True,
        )
    return Finding(check, True, "free")


def auth_finding(where: str, how: str | None) -> Finding:
    """``how`` names the authentication in use (never its value); None: unauthenticated, which
    ``validate`` only lets through with ``allow_unauthenticated`` on loopback: fine, but said."""
    check = f"{where}: authentication"
    if how is None:
        return Finding(
            check, True, "unauthenticated: any process that learns a trace id can forge a sighting"
        )
    return Finding(check, True, how)


class AcceptProbe:
    """Can a receiver accept a connection right now? Listening is not enough: out of file
    descriptors, asyncio stops accepting for a while and senders wait in the kernel's backlog,
    so a heartbeat that only checked "listening" would certify a window in which a delivery sat
    unread (a false ``late``). ``accepts()`` makes one connection to the receiver and waits for
    its protocol to ``claim`` it (answered, never served)."""

    TIMEOUT = 1.0  # seconds for the connection to be accepted

    def __init__(self) -> None:
        self._waiting: dict[Any, asyncio.Future[None]] = {}  # our own client addresses

    def claim(self, peername: Any) -> bool:
        """From ``connection_made``: True for our own probe connection (close it, serve nothing)."""
        fut = self._waiting.get(peername[:2] if isinstance(peername, tuple) else peername)
        if fut is None:
            return False
        if not fut.done():
            fut.set_result(None)
        return True

    async def accepts(self, host: str, port: int) -> bool:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[None] = loop.create_future()
        sock: socket.socket | None = None
        addr = None
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.bind((host, 0))
            addr = sock.getsockname()[:2]
            self._waiting[addr] = seen
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # races the inner result, and close() would then wait for this heartbeat forever.
            async with asyncio.timeout(self.TIMEOUT):
                await loop.sock_connect(sock, (host, port))
                await seen
            return True
        except (OSError, TimeoutError):
            return False
        finally:
            if addr is not None:
                self._waiting.pop(addr, None)
            if sock is not None:
                sock.close()
