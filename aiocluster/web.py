"""aiohttp integration: a site that listens through the cluster's primary.

``ClusterSite`` works with any ``AppRunner`` a user sets up themselves::

    runner = web.AppRunner(app)
    await runner.setup()
    site = aiocluster.web.ClusterSite(runner, "127.0.0.1", 8080)
    await site.start()

In a worker the socket comes from the primary (or, under policy rr, the primary accepts and
hands each connection to the site); outside a cluster the site binds the address itself, so
the same code runs under ``python app.py`` too.
"""

from __future__ import annotations

import asyncio
from ssl import SSLContext

from aiohttp import web

from aiocluster.wire.address import DEFAULT_HOST, DEFAULT_PORT, Address
from aiocluster.worker.adopt import start_server
from aiocluster.worker.deadline import watch_accepted
from aiocluster.worker.link import Grant, announce_closed, listen

__all__ = ["ClusterSite"]


class ClusterSite(web.BaseSite):
    """An aiohttp site on a socket obtained from the cluster primary (or bound locally)."""

    __slots__ = ("_accepted", "_address", "_grant")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None = None,
        port: int | None = None,
        *,
        path: str | None = None,
        address: Address | None = None,
        ssl_context: SSLContext | None = None,
        backlog: int = 2048,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        if address is None:
            if path is not None:
                address = Address.unix(path)
            else:
                address = Address.tcp(host or DEFAULT_HOST, DEFAULT_PORT if port is None else port)
        self._address = address
        self._grant: Grant | None = None
        self._accepted: asyncio.Future[None] | None = None

    @property
    def address(self) -> Address:
        """The address this site asked for (``port`` may be 0; see :attr:`name`)."""
        return self._address

    @property
    def name(self) -> str:
        """The URL served: the real address once started (port 0 resolved)."""
        scheme = "https" if self._ssl_context else "http"
        where = self._grant.sockname if self._grant is not None else str(self._address)
        if where.startswith("unix:"):
            return f"{scheme}://{where}:"
        return f"{scheme}://{where}"

    async def start(self) -> None:
        """Obtain the listen and start serving the runner's server on it."""
        await super().start()
        server = self._runner.server
        assert server is not None
        self._grant = await listen(self._address, self._backlog)
        self._server = await start_server(
            self._grant, server, ssl=self._ssl_context, backlog=self._backlog
        )
        self._accepted = watch_accepted(self._server)

    @property
    def accepted(self) -> asyncio.Future[None] | None:
        """Done once the site is stopped and every connection it accepted has ended (TLS
        handshakes under way included); None before :meth:`start`."""
        return self._accepted

    async def stop(self) -> None:
        """Stop accepting on this site (the runner drains its connections)."""
        await super().stop()
        if self._grant is not None and self._grant.sock is not None:
            announce_closed(self._grant)  # (a HandedServer says so itself when it closes)
