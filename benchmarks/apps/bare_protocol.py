"""A bare asyncio protocol answering every HTTP/1.1 request with one fixed response.

Served with ``aiocluster run bare_protocol:HelloProtocol --protocol``, which listens through
``aiocluster.create_server``. It does not parse HTTP: it counts request ends (``\\r\\n\\r\\n``)
so keep-alive and pipelining work, and closes after answering a request that carries
``Connection: close`` (which is how wrk's connection-per-request mode is driven). Requests with
a body are not supported: this is the floor of what a Python server can cost, not a server.

``drain()`` is aiocluster's hook for a worker that stops (reload, scale-down): the next answer
says ``Connection: close`` and ends the connection, as aiohttp does under aiocluster; a
connection that sends nothing for ``IDLE_GRACE`` seconds is closed.
"""

from __future__ import annotations

import asyncio
import os
from typing import cast

_BODY = b"Hello, World!"
_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"X-Worker-Pid: %d\r\n" % (len(_BODY), os.getpid())
)
RESPONSE = _HEAD + b"\r\n" + _BODY
RESPONSE_CLOSE = _HEAD + b"Connection: close\r\n\r\n" + _BODY
_END = b"\r\n\r\n"


IDLE_GRACE = 2.0


class HelloProtocol(asyncio.Protocol):
    """One instance per connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = b""
        self.closing = False

    def drain(self) -> None:
        self.closing = True
        asyncio.get_running_loop().call_later(IDLE_GRACE, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.transport is not None and not self.pending:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.pending:
            data = self.pending + data
        count = data.count(_END)
        if not count:
            self.pending = data
            return
        tail = data.rfind(_END) + len(_END)
        self.pending = data[tail:]
        if self.closing or (b"lose\r\n" in data and b"onnection: close" in data.lower()):
            transport.write(RESPONSE * (count - 1) + RESPONSE_CLOSE)
            transport.close()
            return
        transport.write(RESPONSE if count == 1 else RESPONSE * count)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


_PID = os.getpid()


def _after_fork() -> None:
    """In a worker forked after this import (aiocluster's fork start method forks its workers
    from a zygote that imported it): answer with this process's pid, not its parent's."""
    global _PID, RESPONSE, RESPONSE_CLOSE
    old, _PID = _PID, os.getpid()
    before, after = (b"X-Worker-Pid: %d\r\n" % pid for pid in (old, _PID))
    RESPONSE, RESPONSE_CLOSE = (
        RESPONSE.replace(before, after),
        RESPONSE_CLOSE.replace(before, after),
    )


os.register_at_fork(after_in_child=_after_fork)
