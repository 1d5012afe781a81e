"""Serving an ASGI 3 application in a worker, on uvicorn's HTTP/1.1 and websocket protocols.

The protocols are uvicorn's own (httptools for HTTP/1.1, the sans-I/O ``websockets`` one for
websockets): fast, and what FastAPI and Starlette users run today. uvicorn's ``Server`` loop is
not used: the worker serves the protocols on the sockets the primary grants (or, under policy
rr, on the connections it hands over, adopted by :mod:`aiocluster.worker.adopt`), and drains
them itself, with the same :class:`~aiocluster.worker.deadline.DrainPlan` as an aiohttp app:

1. stop accepting;
2. every response from now on says ``Connection: close`` (a response already under way keeps
   what it said; the next request on its connection gets the ``close``), so clients move to a
   worker that is not draining without seeing an error;
3. open websockets get a close frame with 1001 (Going Away) after the websocket grace: the app
   receives ``websocket.disconnect`` with code 1001 (Starlette raises ``WebSocketDisconnect``);
4. connections still idle after the idle grace are closed;
5. requests in flight (streams included) run until the deadline, then their tasks are
   cancelled and what is left is aborted;
6. the lifespan ``shutdown`` runs after the connections, within the cleanup allowance.

uvicorn's own ``shutdown()`` closes idle keep-alive connections at once, which is the failed
request every uvicorn reload produces under keep-alive load; it is not called here.

This module imports uvicorn: load it through :func:`aiocluster.worker.serve.asgi_support`, which
turns a missing extra into a one-line error.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from email.utils import formatdate
from typing import Any, TypeAlias

from uvicorn.config import Config
from uvicorn.lifespan.on import LifespanOn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from aiocluster._errors import AioclusterError
from aiocluster.wire.address import Address
from aiocluster.worker.adopt import start_server
from aiocluster.worker.deadline import DrainPlan, wait_handshakes, wait_until, watch_accepted
from aiocluster.worker.link import listen
from aiocluster.worker.metrics import asgi_timing
from aiocluster.worker.proxy import ProxyHeaders
from aiocluster.worker.tracker import ConnectionTracker

__all__ = ["AsgiApp", "AsgiServer", "LifespanFailed"]

log = logging.getLogger("aiocluster.worker")

#: An ASGI 3 application: ``await app(scope, receive, send)``.
AsgiApp: TypeAlias = Callable[
    [dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]

#: Longest wait for cancelled request tasks to end before their connections are aborted.
CANCEL_WAIT = 1.0
#: The reason of the 1001 close frame, as the aiohttp path sends it.
GOING_AWAY = "server shutting down"


class LifespanFailed(AioclusterError):
    """The application's lifespan ``startup`` failed: the worker never listens (a boot failure)."""


class DrainState(ServerState):
    """uvicorn's state shared by a server's protocols, and whether that server drains."""

    def __init__(self) -> None:
        super().__init__()
        #: Set once the drain begins: every later response says ``Connection: close``.
        self.draining = False
        #: How long a connection may stay idle once the drain began (its plan's idle grace).
        self.idle_grace = 0.0
        self._date = b""

    def set_date(self, date: bytes) -> None:
        """The ``Date`` every response from now on carries (uvicorn's Server sets it each
        second; here :class:`AsgiServer` does)."""
        self._date = date
        self._set_default_headers()

    def begin_drain(self, idle_grace: float) -> None:
        """From now on every response says ``Connection: close``."""
        self.idle_grace = idle_grace
        self.draining = True
        self._set_default_headers()

    def _set_default_headers(self) -> None:
        # uvicorn's protocol hands these to each request's cycle as it is made, so a drain
        # costs nothing per request before it begins. (An app that sends a Connection header
        # of its own during a drain sends a second one; "close" is in the list.)
        headers = [(b"date", self._date)] if self._date else []
        if self.draining:
            headers.append(_CLOSE)
        self.default_headers = headers


_CLOSE = (b"connection", b"close")


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, tracked and draining as the module docstring says.

    Nothing is added per request: the tracker hears of the connection's start and end, the
    drain's ``Connection: close`` comes with the default headers (:class:`DrainState`).
    """

    def __init__(
        self,
        config: Config,
        server_state: DrainState,
        app_state: dict[str, Any],
        *,
        tracker: ConnectionTracker,
        access_log: bool,
    ) -> None:
        super().__init__(config=config, server_state=server_state, app_state=app_state)
        # uvicorn turns its access log on whenever any handler would take it (the root one
        # always does under aiocluster): here it is the --access-log option that decides.
        self.access_log = access_log
        self.drain_state = server_state
        self.tracker = tracker

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.tracker.opened(transport, self)
        if self.drain_state.draining:
            # Made after the drain's sweep of idle connections (a TLS handshake that just
            # ended): it gets the same grace, from now.
            self.loop.call_later(self.drain_state.idle_grace, self.close_if_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self.tracker.closed(self.transport)

    def drain(self) -> None:
        """Make the response not yet started on this connection say ``Connection: close``.

        A response whose head is out already keeps it (closing after it would race the
        client's next request); that next request gets the ``close``.
        """
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.keep_alive = False

    def idle(self) -> bool:
        """True between requests: nothing read of a next one, nothing being answered."""
        cycle = self.cycle
        # uvicorn makes a new scope at a request's first byte and its cycle at the end of
        # its headers: a scope that is not the cycle's is a request being received.
        receiving = self.scope is not None and (cycle is None or cycle.scope is not self.scope)
        return not receiving and not self.pipeline and (cycle is None or cycle.response_complete)

    def close_if_idle(self) -> None:
        """Close the connection if it is :meth:`idle`."""
        if self.transport is not None and not self.transport.is_closing() and self.idle():
            self.transport.close()

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        upgraded = self.transport.get_protocol()
        if isinstance(upgraded, WebSocketProtocol):
            # The transport reports its end to the websocket protocol now; the connection
            # trackers watch this protocol's connection_lost, so it is passed on.
            upgraded.on_lost = self.connection_lost


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O websockets protocol, which can close with 1001 on drain."""

    #: Called with the connection's end (see :meth:`HttpProtocol.handle_websocket_upgrade`).
    on_lost: Callable[[Exception | None], None] | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            on_lost, self.on_lost = self.on_lost, None  # it holds the HTTP protocol: a cycle
            if on_lost is not None:
                on_lost(exc)

    def going_away(self, until: float) -> bool:
        """Send a close frame with 1001 and tell the app; True if the websocket was open.

        The client's answering close frame ends the connection; if none comes by the loop
        time ``until``, the transport is closed then.
        """
        if (
            not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or self.initial_response is not None
            or self.transport.is_closing()
        ):
            return False
        self.stop_keepalive()
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1001, "reason": GOING_AWAY})
        self.conn.send_close(1001, GOING_AWAY)
        self.transport.write(b"".join(self.conn.data_to_send()))
        # close_sent stays False, as after a close the client starts: an app that answers
        # the disconnect with websocket.close gets ClientDisconnected (which uvicorn ignores),
        # not an error. The timer keeps the transport open for the client's close frame.
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_at(until, self.transport.close)
        return True


class AsgiServer:
    """One worker's ASGI server: the app's lifespan, its listens, its connections, its drain."""

    def __init__(
        self,
        app: AsgiApp,
        *,
        access_log: bool,
        trusted_proxies: Sequence[str] | None = None,
        timing: bool = True,
    ) -> None:
        """Serve ``app``; with ``trusted_proxies`` (``--forwarded-allow-ips``), the forwarding
        headers of those peers are believed (:class:`~aiocluster.worker.proxy.ProxyHeaders`),
        outside the app, so that the access log shows the client too. With ``timing`` each
        request's latency and status are counted for the metrics."""
        proxy = ProxyHeaders(app, trusted_proxies) if trusted_proxies is not None else None
        served: AsgiApp = app
        if timing:
            served = asgi_timing(app, prepare=proxy.apply if proxy is not None else None)
        elif proxy is not None:
            served = proxy
        # The app goes in as a factory that returns it: uvicorn's Config calls a loaded app
        # with no arguments to detect factories, which an app must never see.
        self.config = Config(
            app=lambda: served,
            factory=True,
            interface="asgi3",
            lifespan="auto",
            log_config=None,
            access_log=access_log,
            proxy_headers=False,  # its rules are not ours: ProxyHeaders above instead
            server_header=False,
            http=HttpProtocol,
            ws=WebSocketProtocol,
        )
        self.config.load()
        self.access_log = access_log
        self.state = DrainState()
        self.tracker = ConnectionTracker()
        self.lifespan = LifespanOn(self.config)
        self.servers: list[asyncio.AbstractServer] = []
        self._accepted: list[asyncio.Future[None]] = []
        self._started = False
        self._clock: asyncio.TimerHandle | None = None

    def stats(self) -> tuple[int, int]:
        """(requests served, connections open), for the worker's heartbeats."""
        return self.state.total_requests, len(self.tracker.transports)

    async def start(
        self, binds: Sequence[Address], backlog: int, tls: ssl.SSLContext | None = None
    ) -> None:
        """Run the lifespan ``startup``, then listen on ``binds`` (over TLS with ``tls``);
        :class:`LifespanFailed` if the startup fails."""
        self._tick()
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            raise LifespanFailed("the ASGI application's lifespan startup failed; see above")
        self._started = True
        factory = self.tracker.wrap(self._protocol, reports=True)
        for address in binds:
            grant = await listen(address, backlog)
            server = await start_server(grant, factory, backlog=backlog, ssl=tls)
            self.servers.append(server)
            self._accepted.append(watch_accepted(server))

    def _protocol(self) -> HttpProtocol:
        return HttpProtocol(
            config=self.config,
            server_state=self.state,
            app_state=self.lifespan.state,
            tracker=self.tracker,
            access_log=self.access_log,
        )

    def _tick(self) -> None:
        # What uvicorn's Server loop does once a second: the Date header every response has.
        self.state.set_date(formatdate(usegmt=True).encode())
        self._clock = asyncio.get_running_loop().call_later(1.0, self._tick)

    async def drain(self, plan: DrainPlan) -> None:
        """Drain as the module docstring says, spending ``plan``; the lifespan shutdown always
        runs."""
        try:
            for server in self.servers:
                server.close()
            self.state.begin_drain(plan.idle_grace)
            self.tracker.begin_drain()
            await self._drain_connections(plan)
        finally:
            await self._shutdown(plan.cleanup_by)

    async def aclose(self) -> None:
        """Stop at once (a start that failed or was cancelled): abort, then shut down."""
        for server in self.servers:
            server.close()
        self.tracker.abort()
        await self._shutdown(asyncio.get_running_loop().time() + CANCEL_WAIT)

    async def _drain_connections(self, plan: DrainPlan) -> None:
        if count := len(self.tracker.transports):
            log.info("draining %d connections (deadline in %gs)", count, plan.graceful_timeout)
        idle = asyncio.ensure_future(self.tracker.wait_idle())
        closer = asyncio.ensure_future(self._close_websockets(plan))
        try:
            await wait_until(idle, plan.began + plan.idle_grace)
            for proto in list(self.state.connections):
                if isinstance(proto, HttpProtocol):
                    proto.close_if_idle()
            await wait_until(idle, plan.deadline)
            await wait_handshakes(self._accepted, self.tracker.wait_idle, plan)
        finally:
            idle.cancel()
            closer.cancel()
        if not self.tracker.transports:
            return
        log.warning(
            "%d connections still busy at the graceful deadline (%gs); cancelling them",
            len(self.tracker.transports),
            plan.graceful_timeout,
        )
        tasks = [task for task in self.state.tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            loop = asyncio.get_running_loop()
            await asyncio.wait(
                tasks, timeout=max(0.0, min(CANCEL_WAIT, plan.cleanup_by - loop.time()))
            )
        self.tracker.abort()

    async def _close_websockets(self, plan: DrainPlan) -> None:
        delay = plan.began + plan.ws_grace - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)  # the grace itself: a message in flight completes
        closed = [
            proto
            for proto in list(self.state.connections)
            if isinstance(proto, WebSocketProtocol) and proto.going_away(plan.deadline)
        ]
        if closed:
            log.info("closed %d websockets with 1001 (going away)", len(closed))

    async def _shutdown(self, until: float) -> None:
        """The lifespan ``shutdown``, if the startup completed, until the loop time ``until``."""
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None
        if not self._started:
            return
        self._started = False
        shutdown = asyncio.ensure_future(self.lifespan.shutdown())
        if not await wait_until(shutdown, until):
            log.error(
                "the lifespan shutdown still runs after the cleanup allowance; exiting without it"
            )
            shutdown.cancel()
        try:
            await shutdown
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("the lifespan shutdown failed")
