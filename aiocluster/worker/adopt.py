"""Serving a granted listen in a worker, including connections the primary accepted.

Under policies ``shared`` and ``reuseport`` a worker accepts on its own socket, with
``loop.create_server`` (under uvloop helped by a :class:`~aiocluster.worker.backlog.Backlog`,
which empties the accept queue when the loop's one accept a turn falls behind). Under ``rr``
it has no socket: the primary accepts and hands each connection over (``newconn``), and
:class:`HandedServer` adopts it with ``loop.connect_accepted_socket`` and the same protocol
factory, so an aiohttp server or a
:class:`~aiocluster._entry.ConnectionTracker` sees adopted connections like any other and a
graceful stop waits for them. Every server also registers a :class:`Route` for its listen,
so that the primary can hand it connections under any policy (a ``reuseport`` scale-down
hands over what a retired slot had queued).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from ssl import SSLContext
from typing import Any, cast

from aiocluster.worker.backlog import Backlog, serve_accepted
from aiocluster.worker.link import (
    Grant,
    WorkerLink,
    announce_closed,
    announce_listening,
    counted,
    is_worker,
    link,
)
from aiocluster.worker.tracker import ConnectionTracker, TrackedFactory

__all__ = ["HandedServer", "Route", "TakingServer", "start_server"]

_SSL_OPTIONS = ("ssl_handshake_timeout", "ssl_shutdown_timeout")


class Route:
    """How this worker serves connections handed over for one listen."""

    def __init__(
        self,
        link: WorkerLink,
        factory: Callable[[], asyncio.BaseProtocol],
        *,
        serving: Callable[[], bool],
        ssl: SSLContext | None = None,
        ssl_options: dict[str, Any] | None = None,
    ) -> None:
        self._link = link
        self._factory = factory
        self._serving = serving
        self._ssl = ssl
        self._ssl_options = ssl_options or {}
        #: Adoptions under way (a TLS handshake may take a while); owned here, never orphaned.
        self.tasks: set[asyncio.Task[None]] = set()

    def adopt(self, sock: socket.socket) -> bool:
        """Start serving ``sock``; False (refused) once the server stopped serving."""
        if not self._serving():
            return False
        self._link.handoffs.note_adopted()
        task = asyncio.get_running_loop().create_task(self._connect(sock))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _connect(self, sock: socket.socket) -> None:
        transport = None
        try:
            transport = await serve_accepted(
                self._factory,
                sock,
                ssl=self._ssl,
                ssl_options=self._ssl_options,
                what="a connection handed over by the primary",
            )
        finally:
            self._link.handoffs.adoption_done(transport)


class HandedServer(asyncio.AbstractServer):
    """A worker's server under policy rr: no listening socket, connections come from the primary.

    Returned by :func:`aiocluster.create_server` (and used by ``ClusterSite``) when the primary
    accepts. :meth:`close` stops adopting: the primary's next handoff is refused and goes to
    another worker. :attr:`sockets` is empty; :attr:`sockname` is the address clients reach.
    """

    def __init__(
        self,
        grant: Grant,
        factory: Callable[[], asyncio.BaseProtocol],
        *,
        ssl: SSLContext | None = None,
        ssl_options: dict[str, Any] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._grant = grant
        self._link = link()
        self._serving = True
        self._closed = asyncio.Event()
        # What wait_closed() waits for, as asyncio's and uvloop's servers do. A factory that
        # is tracked already (serve(protocol=True)'s) is not wrapped twice.
        if not isinstance(factory, TrackedFactory):
            factory = ConnectionTracker().wrap(factory)
        self._connections = factory.tracker
        self._route = Route(
            self._link,
            factory,
            serving=self.is_serving,
            ssl=ssl,
            ssl_options=ssl_options,
        )
        self._link.handoffs.route(grant.handle, self._route)

    @property
    def sockname(self) -> str:
        """The address the primary accepts on for this server (port 0 resolved)."""
        return self._grant.sockname

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """Always empty: the primary holds the listening socket."""
        return ()

    def close(self) -> None:
        """Stop adopting connections (connections already adopted are not touched)."""
        if self._serving:
            self._serving = False
            self._link.handoffs.unroute(self._grant.handle, self._route)
            announce_closed(self._grant)  # so the primary hands us no more
            self._closed.set()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The loop this server runs in."""
        return self._loop

    def is_serving(self) -> bool:
        """True until :meth:`close`."""
        return self._serving

    async def start_serving(self) -> None:
        """Nothing to do: the server serves from its creation."""

    async def serve_forever(self) -> None:
        """Wait until the server is closed."""
        await self._closed.wait()

    async def wait_closed(self) -> None:
        """Wait until the server is closed and every connection it adopted has ended."""
        await self._closed.wait()
        if self._route.tasks:
            await asyncio.gather(*self._route.tasks, return_exceptions=True)
        await self._connections.wait_idle()


class TakingServer(asyncio.AbstractServer):
    """The loop's server on a listening socket, with the :class:`Backlog` that takes what its
    accept leaves queued: :meth:`wait_closed` waits for those connections too (their TLS
    handshakes, which no protocol has heard of yet, as the server's own wait does)."""

    def __init__(self, server: asyncio.AbstractServer, backlog: Backlog) -> None:
        self._server = server
        self._backlog = backlog

    @property
    def sockets(self) -> Any:
        """The listening sockets, as the loop's server gives them."""
        return cast(Any, self._server).sockets

    def close(self) -> None:
        """Stop accepting (the backlog stops with the server)."""
        self._server.close()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The loop this server runs in."""
        return self._server.get_loop()

    def is_serving(self) -> bool:
        """True until :meth:`close`."""
        return self._server.is_serving()

    async def start_serving(self) -> None:
        """Start accepting, if the server was made with ``start_serving=False``."""
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        """Accept until cancelled or closed."""
        await self._server.serve_forever()

    async def wait_closed(self) -> None:
        """Wait until the server is closed, every connection it accepted has ended, and every
        connection the backlog took is served (its handshake done)."""
        await self._server.wait_closed()
        await self._backlog.wait_taken()

    def close_clients(self) -> None:
        """Close every connection the server accepted (Python 3.13's servers)."""
        cast(Any, self._server).close_clients()

    def abort_clients(self) -> None:
        """Abort every connection the server accepted (Python 3.13's servers)."""
        cast(Any, self._server).abort_clients()

    def __getattr__(self, name: str) -> Any:
        # Whatever else the loop's server offers.
        return getattr(self._server, name)


async def start_server(
    grant: Grant,
    factory: Callable[[], asyncio.BaseProtocol],
    *,
    ssl: SSLContext | None = None,
    backlog: int = 2048,
    **kwargs: Any,
) -> asyncio.AbstractServer:
    """Serve ``grant`` with ``factory`` and tell the primary this worker serves it.

    ``kwargs`` go to ``loop.create_server``; under policy rr only the TLS timeouts apply
    (there is no socket to configure), and others raise :class:`TypeError`.
    """
    ssl_options = {key: kwargs.pop(key) for key in _SSL_OPTIONS if key in kwargs}
    server: asyncio.AbstractServer
    if grant.sock is None:
        if kwargs:
            raise TypeError(
                f"under policy rr the primary accepts the connections of {grant.address}: "
                f"{', '.join(sorted(kwargs))} cannot apply"
            )
        server = HandedServer(grant, factory, ssl=ssl, ssl_options=ssl_options)
    else:
        loop = asyncio.get_running_loop()
        sock = grant.sock
        serves = counted(factory)
        backlog_taker = None
        if type(loop).__module__.startswith("uvloop"):
            # asyncio's own loop accepts up to ``backlog`` connections a turn; uvloop one.
            backlog_taker = Backlog(sock, serves, ssl=ssl, ssl_options=ssl_options)
            serves = backlog_taker.watching(serves)
        try:
            real = await loop.create_server(
                serves, sock=sock, ssl=ssl, backlog=backlog, **ssl_options, **kwargs
            )
        except BaseException:
            sock.close()
            raise
        if backlog_taker is not None:
            backlog_taker.serve(real.is_serving)
        if is_worker():
            route = Route(
                link(), factory, serving=real.is_serving, ssl=ssl, ssl_options=ssl_options
            )
            link().handoffs.route(grant.handle, route)
        server = real if backlog_taker is None else TakingServer(real, backlog_taker)
    announce_listening(grant)
    return server
