"""A bounded HTTP load for tests: keep-alive clients on loopback that stop by themselves."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from .harness import ClusterProcess


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    #: Answers per worker id.
    workers: collections.Counter[int] = field(default_factory=collections.Counter)


class KeepAliveLoad:
    """``concurrency`` clients sending requests back to back over keep-alive connections
    (with ``fresh_connections``, a new connection for every request).

    Runs until :meth:`stop`, ``max_requests`` in all, or ``max_seconds``, whichever comes first.
    """

    def __init__(
        self,
        url: str,
        *,
        concurrency: int = 8,
        max_requests: int = 50_000,
        max_seconds: float = 40.0,
        ssl_context: ssl.SSLContext | None = None,
        fresh_connections: bool = False,
    ) -> None:
        self.url = url
        self.ssl_context = ssl_context
        self.fresh_connections = fresh_connections
        self.concurrency = concurrency
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.result = LoadResult()
        self._stop = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> KeepAliveLoad:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> LoadResult:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.result

    async def wait_requests(self, n: int, timeout: float = 20.0) -> None:
        """Wait until ``n`` more requests have been answered (or failed)."""
        target = self.result.ok + self.result.failed + n
        async with asyncio.timeout(timeout), self._progress:
            while self.result.ok + self.result.failed < target:
                if self._task is not None and self._task.done():
                    raise AssertionError("the load stopped early")
                await self._progress.wait()

    async def _run(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.concurrency, force_close=self.fresh_connections)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.max_seconds):
                    await asyncio.gather(*(self._client(session) for _ in range(self.concurrency)))

    async def _client(self, session: aiohttp.ClientSession) -> None:
        result = self.result
        while not self._stop.is_set() and result.ok + result.failed < self.max_requests:
            try:
                async with session.get(self.url, ssl=self.ssl_context or True) as response:
                    data = await response.json()
                    if response.status != 200:
                        raise AssertionError(f"status {response.status}")
                result.ok += 1
                result.workers[int(data["worker"])] += 1
            except (aiohttp.ClientError, AssertionError, TimeoutError, ValueError) as err:
                result.failed += 1
                result.errors.append(f"{type(err).__name__}: {err}")
            async with self._progress:
                self._progress.notify_all()


async def reload_twice_under(
    load: KeepAliveLoad, c: ClusterProcess, new_code: Callable[[], None]
) -> None:
    """With ``load`` running: ``new_code()``, a rolling reload, then another, 300 requests
    between each step, so that every reload happens under load."""
    await load.wait_requests(300)
    new_code()
    c.signal(signal.SIGHUP)
    await c.wait_for("reload complete: 2 workers replaced")
    await load.wait_requests(300)
    mark = len(c.lines)
    c.signal(signal.SIGHUP)
    await c.wait_for("reload complete: 2 workers replaced", start=mark)
    await load.wait_requests(300)
