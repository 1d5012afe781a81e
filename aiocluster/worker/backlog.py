"""Emptying a listening socket's accept queue when the event loop's own pace is too slow.

uvloop's server (libuv) accepts one connection each time its loop finds the listening socket
readable, once per loop turn. A worker serving thousands of connections takes a long turn
(hundreds of milliseconds under a burst), so what queued on its socket then comes out at a
few connections a second, while each of those clients has sent its request and waits: a burst
of 5,000 keep-alive connections left 537 of them in one worker's accept queue for over 5 s
while that worker served 2,100 others (``ss -ltn``; ``strace`` showed 6 ``accept4`` calls in
1.5 s, none reaching ``EAGAIN``), and they are wrk's timeouts.

A :class:`Backlog` sets a timer when the server accepts. If the timer fires late, the loop's
turns are long (:data:`LATE`), and the worker takes what waits in the queue itself, up to
:data:`BATCH` per turn, serving it with the server's protocol factory. A loop whose turns are
short keeps up by itself, and is left alone: taking connections this way costs more than
uvloop's own accept (a task each), measured at 5-8 % more CPU per request with a connection
per request when every timer took what it found; and small bursts still spread over the
workers as the kernel and the loop spread them. Under TLS the handshake of a connection taken
here runs in its task; :class:`~aiocluster.worker.adopt.TakingServer` makes the server's
``wait_closed()`` wait for those too (:meth:`Backlog.wait_taken`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from ssl import SSLContext, SSLError
from typing import Any, TypeVar

from aiocluster.wire.sockets import ACCEPT_CLIENT_ERRORS

__all__ = ["BATCH", "LATE", "LOOK_AGAIN", "Backlog", "serve_accepted"]

log = logging.getLogger("aiocluster.worker")

P = TypeVar("P", bound=asyncio.BaseProtocol)

#: Seconds after an accept by the server at which the queue is looked at again.
LOOK_AGAIN = 0.01
#: How late that timer must fire for the worker to take the queue: the loop's turns are long.
LATE = 0.02
#: Connections taken from the queue at most per loop turn.
BATCH = 256


async def serve_accepted(
    factory: Callable[[], asyncio.BaseProtocol],
    sock: socket.socket,
    *,
    ssl: SSLContext | None = None,
    ssl_options: dict[str, Any] | None = None,
    what: str = "an accepted connection",
) -> asyncio.BaseTransport | None:
    """Serve ``sock``, an accepted connection, with a protocol from ``factory`` (under TLS with
    ``ssl`` and the timeouts in ``ssl_options``): its transport, or None if the connection
    ended before it was served (a client that left or failed its handshake; logged at debug)
    or could not be served (logged with its traceback). ``sock`` is closed then, also when
    this is cancelled. ``what`` names the connection in those lines."""
    options = (ssl_options or {}) if ssl is not None else {}
    try:
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
            factory, sock, ssl=ssl, **options
        )
    except BaseException as err:
        sock.close()
        if isinstance(err, ConnectionError | TimeoutError | SSLError):
            log.debug("%s ended before it was served: %s", what, err)
        elif isinstance(err, Exception):
            log.exception("could not serve %s", what)
        else:
            raise
        return None
    return transport


class Backlog:
    """Takes what waits on ``sock`` beyond the pace of the server that accepts on it."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
        *,
        ssl: SSLContext | None = None,
        ssl_options: dict[str, Any] | None = None,
    ) -> None:
        """``factory`` makes the protocol of each connection taken here (the server's own);
        ``ssl`` and ``ssl_options`` (the TLS timeouts) are the server's too."""
        self._sock = sock
        sock.setblocking(False)
        self._factory = factory
        self._ssl = ssl
        self._ssl_options = ssl_options or {}
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        #: Connections being set up (their transports are made in a task), kept until done.
        self._tasks: set[asyncio.Task[Any]] = set()
        self._serving: Callable[[], bool] = lambda: True

    def watching(self, factory: Callable[[], P]) -> Callable[[], P]:
        """``factory``, for the server: each connection it accepts sets the timer."""

        def accepted() -> P:
            if self._timer is None:
                self._look_in(LOOK_AGAIN)
            return factory()

        return accepted

    def serve(self, serving: Callable[[], bool]) -> None:
        """Take connections while ``serving()`` (the server's ``is_serving``) is true."""
        self._serving = serving

    def _look_in(self, delay: float) -> None:
        self._due = self._loop.time() + delay
        self._timer = self._loop.call_at(self._due, self._look)

    def _look(self) -> None:
        self._timer = None
        if self._loop.time() - self._due < LATE or not self._serving():
            return
        taken = 0
        while taken < BATCH:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in ACCEPT_CLIENT_ERRORS:
                    continue
                # Out of descriptors, or the socket closed: the server's own accept says so.
                log.debug("taking queued connections from %s stopped: %s", self._sock, err)
                return
            taken += 1
            task = self._loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # A full batch: more may wait; look again after this turn (if it is long too).
        self._look_in(0)

    async def wait_taken(self) -> None:
        """Wait until every connection taken so far is served: under TLS, its handshake done
        (or failed). Being cancelled cancels none of them."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _serve(self, conn: socket.socket) -> None:
        await serve_accepted(
            self._factory,
            conn,
            ssl=self._ssl,
            ssl_options=self._ssl_options,
            what="a connection taken from the accept queue",
        )
