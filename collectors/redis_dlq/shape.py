"""The one interface every DLQ shape implements, so the session can look at any of them alike.

A *look* is one MULTI/EXEC: for each of a hop's DLQ keys the session lets the shape queue its
reads (``read``), then for its processing and dead keys (``read_aux``); the shape then turns the
replies, in the same order, into hits per trace id (``parse``, ``parse_aux``). What a shape must
also answer: whether it can tell on its own that an entry came and went between two looks
(streams can, from ``entries-added``; lists and zsets need the poll-mode WATCH, ``guarded``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from collectors.redis_dlq.entries import Hit

if TYPE_CHECKING:
    from collectors.redis_dlq.target import Target

Checks = dict[str, list[tuple[str, str]]]  # per key: (trace id, stream entry id) still followed

# Keyspace events that cannot remove an element. Anything else on a list/zset key counts as a
# removal (conservative: an unknown event can only make us report blindness, never hide it).
ADDS = {"lpush", "rpush", "linsert", "zadd", "zincr", "xadd"}
NEUTRAL = {"expire", "persist", "new", "hset", "hdel", "hincrby", "hincrbyfloat"}
# Events that take entries away without any worker touching them one by one: someone deleted,
# renamed, overwrote or trimmed the key, or Redis expired or evicted it. An entry gone with one
# of these was wiped, not retried (an explicit ``del`` counts; the implicit one after the last
# element's removal does not).
WIPES = {
    "del",
    "rename_from",
    "move_from",
    "expired",
    "evicted",
    "set",
    "copy_to",
    "restore",
    "sortstore",
    "xtrim",
}


@dataclass
class Key:
    """What the looks remember about one concrete DLQ key."""

    members: Counter[str] | None = None  # list/zset contents at the last look
    removes: int = 0  # list/zset: removal notifications since the last look
    last_op: str = ""
    credit: int = 0  # visible removals whose notification had not arrived yet
    cursor: str | None = None  # stream: last id read
    added: int | None = None  # stream: entries-added at the last look
    last_generated: str = "0-0"
    fresh: list[str] = field(default_factory=list)  # stream ids accepted since the last look
    wiped: str | None = None  # push: a WIPES event since the last look (its name)
    unnoted: int = 0  # list/zset push: removals the last look saw that no notification explains
    gone: bool = False  # stream: the key vanished or was recreated since the last look
    partial: bool = False  # list/zset: longer than max_scan at the last look (its tail unread)

    def note(self, op: str) -> None:
        # An LREM/ZREM that empties a key is followed by an implicit 'del': one removal, not two.
        implicit = op == "del" and self.last_op not in ("", *ADDS, *NEUTRAL)
        if op not in ADDS and op not in NEUTRAL and not implicit:
            self.removes += 1
            if op in WIPES:
                self.wiped = op
        self.last_op = op


class Shape(Protocol):
    name: str  # the hop's ``shape:`` and the Redis type SCAN looks for
    guarded: bool  # poll mode: WATCH the keys between looks, since the shape cannot count misses

    def new_key(self) -> Key:
        """State for a key first met after the hop's first look (by SCAN or a notification)."""
        ...

    def read(self, p: Pipeline, key: str, ks: Key, checks: list[tuple[str, str]], max_scan: int) -> None:
        """Queue the reads of one DLQ key."""
        ...

    def read_aux(self, p: Pipeline, key: str, max_scan: int) -> None:
        """Queue the read of a processing or dead key (one reply)."""
        ...

    async def parse(
        self,
        r: Redis,
        t: Target,
        keys: tuple[str, ...],
        replies: Iterator[Any],
        removes: dict[str, int],
        checks: Checks,
        push: bool,
    ) -> tuple[dict[str, Hit], str | None, bool]:
        """Consume what ``read`` queued for ``keys``: (hit per trace id, a key read only in part,
        whether an entry may have come and gone unseen since the previous look)."""
        ...

    async def parse_aux(self, r: Redis, t: Target, key: str, raw: Any) -> dict[str, Hit]:
        """The probes' entries in a processing or dead key (first hit per trace id)."""
        ...


class LookError(Exception):
    """A look that returned an error for one key (wrong shape, ACL): blind, but no reconnect."""


def raise_if_error(value: Any, key: str, shape: str) -> None:
    if isinstance(value, ResponseError):
        text = str(value)
        if text.startswith("WRONGTYPE"):
            raise LookError(f"key {key!r} is not a {shape}")
        raise LookError(f"reading {key!r}: {text[:120]}")
