"""Redis dead-letter-queue collector: when a probe's entry landed in the DLQ, when the retry worker
first took it, and whether that ended in success (``resolved``) or in the dead key (``dead``).

Shapes: ``list`` (LPUSH + LREM/LMOVE), ``zset`` (scored by next retry, Sidekiq-style) and
``stream`` (XADD, consumer groups, XDEL when done). A hop names one ``event``:

``entry``     an entry carrying the trace id is in the DLQ key (``sink_time``: its own timestamp)
``retry``     the first retry began: the entry left the DLQ key (popped / claimed / deleted), or
              came back with a higher attempt, or reached the processing or dead key
``resolved``  it is gone from the DLQ, the processing key and the dead key, in one snapshot
``dead``      it is in ``dead_key``

How it sees. A *look* reads every key of a hop in one MULTI/EXEC, so "gone from all three" is
one instant's truth, never two reads stitched together. In ``push`` mode, keyspace notifications
(``CONFIG SET notify-keyspace-events``, merged into what is set already) trigger a look within a
round trip of each write, and streams are also read with ``XREAD BLOCK``; a safety-net look runs
every ``poll_interval``. Without permission to use notifications (managed Redis), or in ``poll``
mode, a look runs every ``poll_interval``.

An entry that comes and goes between two looks (retried within milliseconds) is the one thing a
look cannot show. It is either still caught or reported, never silently lost:
- streams: a blocked ``XREAD`` is handed every added entry at once, even one deleted right after;
  and each look compares the stream's ``entries-added`` counter with the entries we received,
  so an entry added and deleted unseen (while we were not blocked) is counted as missed;
- lists and zsets, push: each look counts the removal notifications since the previous look
  against the removals it can see (entries gone since then). A removal it cannot account for
  removed something it never saw;
- lists and zsets, poll: the keys are WATCHed (on two alternating connections, so the watch
  always spans the interval between two snapshots); a key that changed at all might have held
  an entry we never saw.
A possible miss while some probe's entry is still unseen marks ``(previous look, this look]``
blind in ``coverage`` (``Coverage(retroactive=False)``: a retry of an entry we never saw cannot
be found later), so the verdict is ``unknown``, not ``lost``. Redis down is blind too, from the
last certified moment until the next good look, and while it reconnects with backoff. In push
mode a good look is not enough to certify: a PING on the listener's connection is answered only
after every notification published before it, so coverage is certified through the earlier of
the last good look and the last answered PING, and a dead or lagging listener certifies nothing.

Taken, or wiped? An entry gone from the DLQ is a retry only when a worker could have taken it.
When it went with the key itself (DEL, RENAME, EXPIRE, eviction, SET over it, XTRIM; in push
mode, told by the event), in a FLUSHALL/FLUSHDB/SWAPDB (their call counts in ``INFO
commandstats`` are read inside every look; they send no event), with a stream that was deleted,
with no removal event at all (push: notifications switched off), while its key could not be read
(WRONGTYPE), or in a server restart, its absence proves nothing: the probe's trace is marked
``lost`` (its retry and resolution unknown, ``(previous look, this look]`` blind, and ``explain``
says why). Before judging such a look in push mode, a PING on the listener's connection makes
sure every event published before it has been read. Only in poll mode is a DEL of a list or zset
key indistinguishable from a worker's pop. A probe's entry is pinned to its own ``id`` at first
sight: another entry carrying the same trace id under another id (a copy, a forgery) is never
its retry, processing or dead entry. A glob matching more than ``max_keys`` keys is a partial
look (blind), like a key longer than ``max_scan``. Without permission to run INFO, flushes are
not counted and each reconnect is taken as a possible restart.

Assumptions worth knowing: ``resolved`` requires that the worker moves an entry atomically (the
reliable-queue pattern: claim into ``processing_key``, re-park or dead-letter in the same MULTI or
Lua call); a worker that holds an entry only in memory while retrying looks resolved until it
re-parks it. The first look of a hop's keys happens on the first watch for it, so a probe retried
within that first round trip is not guaranteed to be caught. A key or glob pattern's keys are read
up to ``max_scan`` entries; a longer key makes the look partial, reported as blind.

Side metadata: ``meta_hash`` alone means the members are bare ids and the hash holds each
entry's JSON; with ``meta_id_path`` the members are JSON entries and the hash field is named by
``meta_field`` (``{id}`` replaced by the id at that path), holding JSON or a bare attempt count.
An attempt bumped there while the entry stays put is the retry, at the look after the bump. A
member carrying a watched trace id whose field is missing twice is warned about once and named
in the hop's evidence.

Leaving Redis as found: the notify-keyspace-events flags the collector added are removed again
on close unless ``keep_notifications: true``. ``explain`` says, from the looks' own records, where
a late or lost probe's entry was (still parked at attempt N, in processing, dead, removed without
a retry) and how many other entries the keys held in the window; ``preflight`` checks the
credentials (a wrong password blocks the sink), each key's type against ``shape`` and the
notification plan, reading only.

How the package is laid out, and how to add a shape. ``collector.py`` is what the engine sees;
``session.py`` owns the Redis connection and decides when to look; ``target.py`` holds what is
known per hop and turns looks into events; ``entries.py`` parses an entry (and ``meta_hash``
lookups); ``config.py`` is the YAML; ``explain.py`` and ``preflight.py`` the evidence and the doctor's checks. A shape is one module implementing the ``Shape`` protocol
in ``shape.py``: ``read``/``read_aux`` queue its commands into the look's MULTI, ``parse``/
``parse_aux`` turn the replies into hits per trace id, ``new_key`` is its per-key state and
``guarded`` says whether it needs the poll-mode WATCH. Lists and zsets share ``members.py`` and
differ only in their commands (``list_shape.py``, ``zset_shape.py``); ``stream_shape.py`` does
its own miss accounting. To add one: write ``<name>_shape.py``, add it to ``SHAPES`` in
``target.py`` and its name to ``RedisDlqHop.shape`` in ``config.py``, and add it to the
parametrized shapes in ``tests/test_redis_dlq.py``.
"""

from collectors.redis_dlq.collector import RedisDlqCollector
from collectors.redis_dlq.config import RedisDlqConfig, RedisDlqHop
from collectors.redis_dlq.preflight import preflight
from tracer.plugins import SinkPlugin

__all__ = ["RedisDlqCollector", "RedisDlqConfig", "RedisDlqHop", "plugin"]

plugin = SinkPlugin(
    name="redis_dlq",
    config=RedisDlqConfig,
    hop=RedisDlqHop,
    factory=RedisDlqCollector,
    summary="a Redis dead-letter queue (list, sorted set or stream): entries, retries, resolution",
    preflight=preflight,
)
