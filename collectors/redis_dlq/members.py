"""What lists and sorted sets share: keys whose members are the entries.

Both are read whole (up to ``max_scan``) and compared with the previous look. In push mode the
removal notifications since then are counted against the removals the look can see; in poll
mode the keys are WATCHed (``Guard``). ``list_shape`` and ``zset_shape`` only choose commands.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from collectors.redis_dlq.entries import Hit
from collectors.redis_dlq.shape import Checks, Key, raise_if_error

if TYPE_CHECKING:
    from collectors.redis_dlq.target import Target


class MemberShape:
    """Base of ``list`` and ``zset``; subclasses queue their own commands."""

    name = ""
    guarded = True

    def new_key(self) -> Key:
        return Key(members=Counter())

    def read(self, p: Pipeline, key: str, ks: Key, checks: list[tuple[str, str]], max_scan: int) -> None:
        raise NotImplementedError  # queue the size, then the members

    def read_aux(self, p: Pipeline, key: str, max_scan: int) -> None:
        raise NotImplementedError

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
        main: dict[str, Hit] = {}
        partial: str | None = None
        missed = False
        for k in keys:
            ks = t.keys[k]
            size, raw = next(replies), next(replies)
            raise_if_error(size, k, self.name)
            raise_if_error(raw, k, self.name)
            members = _members(raw)
            ks.partial = size > len(members)
            if ks.partial:
                partial = k
            now = Counter(members)
            visible = sum((ks.members - now).values()) if ks.members is not None else 0
            # Removal notifications this look cannot pin on an entry it saw leave. A negative
            # balance (the removal seen before its notification arrived) is credit for one look.
            unexplained = removes.get(k, 0) - visible + ks.credit
            ks.unnoted = -unexplained if push and ks.members is not None else 0
            ks.credit = min(0, removes.get(k, 0) - visible)
            missed = missed or (push and ks.members is not None and unexplained > 0)
            ks.members = now
            for m, info in (await t.entries.of_members(r, members, t.traces)).items():
                t.saw(k, m, info.traces)
                for tid in info.traces:
                    if tid in t.traces:
                        t.offer(main, tid, Hit(k, info))
        return main, partial, missed

    async def parse_aux(self, r: Redis, t: Target, key: str, raw: Any) -> dict[str, Hit]:
        hits: dict[str, Hit] = {}
        for info in (await t.entries.of_members(r, _members(raw), t.traces)).values():
            for tid in info.traces:
                if tid in t.traces:
                    t.offer(hits, tid, Hit(key, info))
        return hits


class Guard:
    """Poll mode: did any of ``keys`` change between two snapshots? WATCH on two connections that
    take turns, so a watch is always armed before the previous snapshot and checked by the next."""

    def __init__(self, r: Redis) -> None:
        self._pipes = [r.pipeline(transaction=True), r.pipeline(transaction=True)]
        self._turn = 0
        self._keys: tuple[str, ...] = ()

    async def snapshot(
        self, r: Redis, keys: tuple[str, ...], build: Callable[[Pipeline], None]
    ) -> tuple[list[Any], bool | None]:
        cur, nxt = self._pipes[self._turn], self._pipes[1 - self._turn]
        armed = self._keys == keys and bool(keys) and cur.watching
        was_armed = bool(self._keys)
        await nxt.reset()
        if keys:
            await nxt.watch(*keys)
        changed: bool | None = None
        result: list[Any] | None = None
        if armed:
            cur.multi()
            build(cur)
            try:
                result = await cur.execute(raise_on_error=False)
                changed = False
            except WatchError:
                changed = True
        await cur.reset()
        if result is None:
            async with r.pipeline(transaction=True) as p:
                build(p)
                result = await p.execute(raise_on_error=False)
        self._turn = 1 - self._turn
        if changed is None and was_armed and self._keys != keys:
            changed = True  # the set of matching keys itself changed
        self._keys = keys
        return result, changed

    async def close(self) -> None:
        for p in self._pipes:
            with contextlib.suppress(Exception):
                await p.reset()


def _members(raw: Any) -> list[str]:
    return [str(m) for m in raw]
