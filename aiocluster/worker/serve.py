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
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

from aiocluster._config import ClusterConfig
from aiocluster._errors import AppLoadError
from aiocluster.wire.address import DEFAULT_HOST, DEFAULT_PORT, Address
from aiocluster.worker.adopt import start_server
from aiocluster.worker.link import link, listen
from aiocluster.worker.tracker import ConnectionTracker

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "AppTarget",
    "create_server",
    "resolve_app",
    "serve_app_worker",
    "serve_protocol_worker",
    "until_stopped",
]

log = logging.getLogger("aiocluster")

AppFactory: TypeAlias = Callable[[], "web.Application | Awaitable[web.Application]"]
#: What ``serve`` accepts: an aiohttp Application, a factory returning one (sync or async),
#: or, with ``protocol=True``, an asyncio protocol factory.
AppTarget: TypeAlias = "web.Application | AppFactory | Callable[[], asyncio.BaseProtocol]"


async def resolve_app(target: AppTarget) -> web.Application:
    """The Application itself, or what a factory (sync or async) returns."""
    from aiohttp import web

    if isinstance(target, web.Application):
        return target
    if not callable(target):
        raise AppLoadError(f"cannot serve {target!r}: expected an aiohttp Application or a factory")
    result: Any = target()
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, web.Application):
        raise AppLoadError(
            f"the factory {getattr(target, '__qualname__', target)!r} returned "
            f"{type(result).__name__}, not an aiohttp Application (for an asyncio protocol "
            "factory pass protocol=True, or --protocol on the command line)"
        )
    return result


async def serve_app_worker(target: AppTarget, config: ClusterConfig, *, access_log: bool) -> None:
    # Imported here: the primary, and workers serving bare protocols, never load aiohttp.
    from aiohttp import web

    from aiocluster.web import ClusterSite
    from aiocluster.worker.drain import OpenWebsockets, drain_app

    current = link()
    runner: web.AppRunner | None = None
    websockets = OpenWebsockets()

    async def start() -> None:
        nonlocal runner
        app = await resolve_app(target)
        if not websockets.attach(app):
            log.warning("the application is frozen already: its websockets are not closed on drain")
        runner = web.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=current.graceful_timeout,
            access_log=logging.getLogger("aiohttp.access") if access_log else None,
            # aiohttp's keep-alive timer runs from the connection's start too: it also closes
            # a connection whose first request head is still trickling in.
            keepalive_timeout=config.keep_alive,
            max_line_size=config.limit_request_line,
            max_headers=config.limit_request_fields,
            max_field_size=config.limit_request_field_size,
        )
        await runner.setup()
        server = runner.server
        assert server is not None
        current.add_stats_source(lambda: (server.requests_count, len(server.connections)))
        for address in current.binds or config.binds:
            await ClusterSite(runner, address=address, backlog=config.backlog).start()

    drained = False
    with _stop_signals(current.stopping):
        await current.ensure_online()
        try:
            if await _start_unless_stopped(current.stopping, start()):
                await current.stopping.wait()
                assert runner is not None
                drained = True  # drain_app runs the cleanup hooks, whatever happens in it
                await drain_app(runner, current.drain_plan(), websockets)
        finally:
            if runner is not None and not drained:
                await runner.cleanup()  # a start that failed or was cancelled
    current.close()


async def serve_protocol_worker(
    factory: Callable[[], asyncio.BaseProtocol], config: ClusterConfig
) -> None:
    if _is_aiohttp_app(factory):
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
        for address in current.binds or config.binds:
            servers.append(
                await create_server(tracker.wrap(factory), address=address, backlog=config.backlog)
            )

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


def _is_aiohttp_app(target: object) -> bool:
    # Without importing aiohttp: a protocol worker never loads it, and an Application's
    # module has loaded it already.
    web = sys.modules.get("aiohttp.web")
    return web is not None and isinstance(target, web.Application)


async def _start_unless_stopped(stopping: asyncio.Event, start: Coroutine[Any, Any, None]) -> bool:
    """Run a worker's start (the app's factory and on_startup hooks, its listens) unless the
    worker is told to stop first; True if it started.

    A stop asked for meanwhile (the cluster stops, the primary is gone) cancels the start:
    the worker never serves, and exits cleanly instead of listening on a cluster that has
    closed its sockets. A listen the primary refused because the cluster is stopping is not
    an error either; any other failure is.
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
        if not stopping.is_set() or err.errno != errno.ESHUTDOWN:
            raise
        log.info("told to stop while starting: not serving (%s)", err.strerror)
        return False
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
