"""A sink and an injector outside funnel-tracer's packages, found only through entry points.

The injector appends one line per probe to a file; the collector polls the file and reports each
line that carries a watched trace id. It uses only the public plugin contract (``tracer.plugins``,
``tracer.watch``, ``tracer.schema``), as any third-party sink would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from tracer import clock
from tracer.inject import Injection
from tracer.plugins import InjectContext, InjectorPlugin, SinkPlugin
from tracer.probe import Probe
from tracer.schema import Duration, Model
from tracer.watch import Coverage, Observation, Watch, WatchIndex


class LineFileConfig(Model):
    path: str = Field(min_length=1, description="file to watch")
    interval: Duration = Field(0.1, gt=0, description="poll interval")


class LineFileHop(Model):
    prefix: str = Field("", description="the line must start with this")


class LineFileCollector:
    sink: ClassVar[str] = "linefile"

    def __init__(self, config: LineFileConfig) -> None:
        self.config = config
        self.coverage = Coverage(retroactive=True)  # the file keeps every line
        self._index = WatchIndex()
        self._offset = 0
        self._task: asyncio.Task[None] | None = None
        self.lines = 0

    @property
    def error_bar(self) -> float:
        return self.config.interval

    async def start(self) -> None:
        self.coverage.looked(clock.now())
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def watch(self, w: Watch) -> None:
        self._index.add(w)

    def unwatch(self, w: Watch) -> None:
        self._index.discard(w)

    def health(self) -> dict[str, Any]:
        return {"up": not self.coverage.blind_now, "lines": self.lines}

    async def _run(self) -> None:
        previous = clock.now()
        while True:
            await asyncio.sleep(self.config.interval)
            looked = clock.now()
            try:
                with open(self.config.path, encoding="utf-8") as f:
                    f.seek(self._offset)
                    text = f.read()
                    self._offset = f.tell()
            except FileNotFoundError:
                text = ""  # nothing written yet: an empty file, seen
            except OSError:
                self.coverage.failed(looked)
                continue
            for line in text.splitlines():
                self.lines += 1
                for w in self._index.in_text(line):
                    if line.startswith(w.sink_spec.prefix):
                        w.observe(Observation(at=looked, not_before=previous, source="poll"))
            self.coverage.looked(looked)
            previous = looked


class LineFileInject(Model):
    path: str = Field(min_length=1)
    line: str = Field("probe {trace_id}", description="template for the line written")
    timeout: Duration = 1.0


class LineFileInjector:
    def __init__(self, config: LineFileInject, ctx: InjectContext) -> None:
        self.config = config
        self.timeout = config.timeout

    async def send(self, probe: Probe) -> Injection:
        sent = clock.now()
        try:
            fd = os.open(self.config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (probe.render(self.config.line) + "\n").encode())
            finally:
                os.close(fd)
        except OSError as exc:
            return Injection(sent, clock.now(), ok=False, error=f"cannot write: {exc.strerror}")
        return Injection(sent, clock.now(), ok=True, attributes={"file.path": Path(self.config.path).name})

    async def close(self) -> None:
        """Nothing held."""


sink = SinkPlugin(
    name="linefile",
    config=LineFileConfig,
    hop=LineFileHop,
    factory=LineFileCollector,
    summary="lines of a local file (a test plugin)",
)
injector = InjectorPlugin(
    name="linefile",
    config=LineFileInject,
    factory=LineFileInjector,
    summary="append a line to a local file (a test plugin)",
)
