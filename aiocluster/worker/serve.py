"""Serving in a worker: each kind of application on the sockets the primary grants.

A worker gets its listening sockets from the primary (or, under policy rr, the connections),
serves the application until told to stop, then drains. Outside a cluster the same calls
bind their own sockets, so an app written for a cluster runs alone too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias

from aiocluster._config import ClusterConfig
from aiocluster._errors import AppLoadError, ClusterFailed, ListenRefused
from aiocluster._kinds import (
    AppKind,
    Interface,
    check_interface,
    classify,
    is_aiohttp_app,
    is_asgi3,
    name_of,
)
from aiocluster._tls import server_context
from aiocluster.wire.address import DEFAULT_HOST, DEFAULT_PORT, Address
from aiocluster.worker.adopt import start_server
from aiocluster.worker.deadline import DrainPlan
from aiocluster.worker.link import link, listen
from aiocluster.worker.tracker import ConnectionTracker

if TYPE_CHECKING:
    from aiohttp import web

    from aiocluster.worker.asgi import AsgiApp, AsgiServer

__all__ = [
    "AppTarget",
    "asgi_support",
    "create_server",
    "resolve_app",
    "serve_app_worker",
    "serve_protocol_worker",
    "until_stopped",
]

log = logging.getLogger("aiocluster")

AppFactory: TypeAlias = Callable[[], "web.Application | Awaitable[web.Application]"]
#: What ``serve`` accepts: an aiohttp Application, an ASGI 3 application, a factory returning
#: either (sync or async), or, with ``interface="protocol"``, an asyncio protocol factory.
AppTarget: TypeAlias = "web.Application | AsgiApp | AppFactory | Callable[[], asyncio.BaseProtocol]"

_ASGI_EXTRA = ("uvicorn", "httptools", "websockets")


def asgi_support() -> ModuleType:
    """:mod:`aiocluster.worker.asgi`, or :class:`AppLoadError` saying which extra to install."""
    try:
        from aiocluster.worker import asgi
    except ImportError as err:
        if err.name is None or err.name.partition(".")[0] not in _ASGI_EXTRA:
            raise
        raise AppLoadError(
            f"serving an ASGI application needs uvicorn, httptools and websockets ({err}): "
            "pip install 'aiocluster[asgi]'"
        ) from None
    return asgi


async def resolve_app(target: AppTarget, interface: Interface = "auto") -> tuple[AppKind, Any]:
    """What to serve and its kind: ``target`` itself, or what a factory (sync or async) returns.

    :class:`AppLoadError` if it is not an aiohttp Application nor an ASGI 3 application, or
    not the ``interface`` asked for.
    """
    kind = classify(target)
    app: Any = target
    if kind == "factory":
        app = target()  # type: ignore[call-arg]
        if inspect.isawaitable(app):
            app = await app
        if is_aiohttp_app(app):
            kind = "aiohttp"
        elif is_asgi3(app):
            kind = "asgi"
        else:
            raise AppLoadError(
                f"the factory {name_of(target)!r} returned {type(app).__name__}, not an aiohttp "
                "Application or an ASGI 3 application (for an asyncio protocol factory pass "
                "interface='protocol', or --interface protocol on the command line)"
            )
    check_interface(kind, interface, name_of(target))
    return kind, app


class _AiohttpServed:
    """An aiohttp Application in a worker: its runner, its sites, its drain."""

    def __init__(
        self,
        app: web.Application,
        config: ClusterConfig,
        *,
        access_log: bool,
        graceful_timeout: float,
        trusted_proxies: Sequence[str] | None,
        timing: bool,
    ) -> None:
        from aiohttp import web

        from aiocluster.worker.drain import OpenWebsockets
        from aiocluster.worker.metrics import aiohttp_timing

        self.websockets = OpenWebsockets()
        if not self.websockets.attach(app):
            log.warning("the application is frozen already: its websockets are not closed on drain")
        # Applied around the server's handler once it exists (see start()).
        self.trusted_proxies = trusted_proxies
        # Without timing nobody takes the metrics (no --admin): nothing is counted per request.
        if timing and app.frozen:
            log.warning("the application is frozen already: its requests are not timed")
        elif timing:
            # First of all: it times every other middleware, and counts what they answer.
            app.middlewares.insert(0, aiohttp_timing())
        self.runner = web.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=graceful_timeout,
            access_log=logging.getLogger("aiohttp.access") if access_log else None,
            # aiohttp's keep-alive timer runs from the connection's start too: it also closes
            # a connection whose first request head is still trickling in.
            keepalive_timeout=config.keep_alive,
            max_line_size=config.limit_request_line,
            max_headers=config.limit_request_fields,
            max_field_size=config.limit_request_field_size,
        )

    def stats(self) -> tuple[int, int]:
        server = self.runner.server
        return (server.requests_count, len(server.connections)) if server is not None else (0, 0)

    async def start(
        self, binds: Sequence[Address], backlog: int, tls: ssl.SSLContext | None
    ) -> None:
        from aiocluster.web import ClusterSite

        await self.runner.setup()
        server = self.runner.server
        if self.trusted_proxies is not None and server is not None:
            from aiocluster.worker.proxy import proxy_handler

            # Before every middleware: they all see the client as the proxy says.
            server.request_handler = proxy_handler(server.request_handler, self.trusted_proxies)
        for address in binds:
            site = ClusterSite(self.runner, address=address, ssl_context=tls, backlog=backlog)
            await site.start()

    async def drain(self, plan: DrainPlan) -> None:
        from aiocluster.worker.drain import drain_app

        await drain_app(self.runner, plan, self.websockets)

    async def aclose(self) -> None:
        await self.runner.cleanup()


async def serve_app_worker(
    target: AppTarget,
    config: ClusterConfig,
    *,
    access_log: bool,
    interface: Interface = "auto",
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Serve an aiohttp or ASGI application in this worker until told to stop, then drain it.

    TLS: ``ssl_context``, else one built now from ``config``'s files (read afresh by every
    worker, so a reload rotates certificates). Forwarding headers are believed as
    ``config.proxy_headers`` and ``forwarded_allow_ips`` say (aiohttp and ASGI apps alike).
    """
    current = link()
    served: _AiohttpServed | AsgiServer | None = None

    async def start() -> None:
        nonlocal served
        kind, app = await resolve_app(target, interface)
        tls = ssl_context or server_context(config)
        trusted = config.forwarded_allow_ips if config.proxy_headers else None
        if kind == "asgi":
            served = asgi_support().AsgiServer(
                app, access_log=access_log, trusted_proxies=trusted, timing=current.reports_metrics
            )
        else:
            served = _AiohttpServed(
                app,
                config,
                access_log=access_log,
                graceful_timeout=current.graceful_timeout,
                trusted_proxies=trusted,
                timing=current.reports_metrics,
            )
        current.add_stats_source(served.stats)
        await served.start(_starting_listens(config), config.backlog, tls)

    drained = False
    with _stop_signals(current.stopping):
        await current.ensure_online()
        try:
            if await _start_unless_stopped(current.stopping, start()):
                await current.stopping.wait()
                assert served is not None
                drained = True  # drain() runs the cleanup hooks, whatever happens in it
                await served.drain(current.drain_plan())
        finally:
            if served is not None and not drained:
                await served.aclose()  # a start that failed or was cancelled
    current.close()


async def serve_protocol_worker(
    factory: Callable[[], asyncio.BaseProtocol],
    config: ClusterConfig,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Serve an asyncio protocol factory on the cluster's listens (TLS as for an app)."""
    if is_aiohttp_app(factory):
        raise AppLoadError(
            f"cannot serve {factory!r} as a protocol: it is an aiohttp Application "
            "(drop --protocol / protocol=True)"
        )
    if not callable(factory):
        raise AppLoadError(f"cannot serve {factory!r}: a protocol factory must be callable")
    current = link()
    tracker = ConnectionTracker()
    current.add_stats_source(lambda: (tracker.accepted, len(tracker.transports)))
    servers: list[asyncio.AbstractServer] = []

    async def start() -> None:
        tls = ssl_context or server_context(config)
        for address in _starting_listens(config):
            server = await create_server(
                tracker.wrap(factory), address=address, backlog=config.backlog, ssl=tls
            )
            servers.append(server)

    with _stop_signals(current.stopping):
        await current.ensure_online()
        try:
            if await _start_unless_stopped(current.stopping, start()):
                await current.stopping.wait()
        finally:
            for server in servers:
                server.close()
            await tracker.drain(current.drain_plan().deadline)
    current.close()


async def _start_unless_stopped(stopping: asyncio.Event, start: Coroutine[Any, Any, None]) -> bool:
    """Run a worker's start (the app's factory and on_startup hooks, its listens) unless the
    worker is told to stop first; True if it started.

    A stop asked for meanwhile (the cluster stops, the primary is gone) cancels the start:
    the worker never serves, and exits cleanly instead of listening on a cluster that has
    closed its sockets. A listen the primary refused because the cluster is stopping is not
    an error either; any other failure is, and a listen the primary refused (it has logged
    why) is :class:`ClusterFailed`, which ``aiocluster.run()`` ends with quietly.
    """
    starting = asyncio.ensure_future(start)
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not starting.done():
            starting.cancel()
    try:
        await starting
    except asyncio.CancelledError:
        if not stopping.is_set():
            raise
        log.info("told to stop while starting: not serving")
        return False
    except OSError as err:
        if stopping.is_set() and err.errno == errno.ESHUTDOWN:
            log.info("told to stop while starting: not serving (%s)", err.strerror)
            return False
        if isinstance(err, ListenRefused):
            # The primary has said why, once for the cluster: no traceback from each worker.
            raise ClusterFailed(str(err)) from err
        raise
    return True


async def until_stopped() -> None:
    """In a worker, wait until it must stop: ``disconnect``, SIGTERM/SIGINT, or primary gone.

    For workers that serve by hand (their own ``AppRunner`` with ``ClusterSite``, or
    ``create_server``): await this, then close your servers gracefully.
    """
    current = link()
    with _stop_signals(current.stopping):
        await current.ensure_online()
        await current.stopping.wait()


def _starting_listens(config: ClusterConfig) -> Sequence[Address]:
    """The binds this worker serves (the primary's, else the configured ones), announced to
    the link as the listens it is about to start: it is ready after the last."""
    current = link()
    binds = current.binds or config.binds
    current.expect_listens(len(binds))
    return binds


@contextlib.contextmanager
def _stop_signals(stopping: asyncio.Event) -> Iterator[None]:
    """In a worker, SIGTERM and SIGINT ask for a graceful stop, like ``disconnect``."""
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGTERM, signal.SIGINT)

    def on_signal(sig: signal.Signals) -> None:
        if not stopping.is_set():
            log.info("%s received; draining", sig.name)
        stopping.set()

    for sig in sigs:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | None = None,
    port: int | None = None,
    *,
    path: str | None = None,
    address: Address | None = None,
    backlog: int = 2048,
    **kwargs: Any,
) -> asyncio.AbstractServer:
    """A cluster-aware ``loop.create_server``.

    In a worker the listening socket comes from the primary (shared by all workers, or this
    worker slot's own under policy reuseport); outside a cluster it is bound here. Under policy
    rr the primary accepts and the result is a :class:`~aiocluster.HandedServer`, which adopts
    the connections the primary hands over (it has no ``sockets``). Extra keyword arguments go
    to ``loop.create_server`` (``ssl``...).
    """
    if address is None:
        if path is not None:
            address = Address.unix(path)
        else:
            address = Address.tcp(host or DEFAULT_HOST, DEFAULT_PORT if port is None else port)
    grant = await listen(address, backlog)
    return await start_server(grant, protocol_factory, backlog=backlog, **kwargs)
