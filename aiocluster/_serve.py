"""``serve``, ``run`` and ``create_server``: the one entry point, acting by role.

In the primary they start and supervise workers; in a worker they obtain sockets from the
primary and serve the application until told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import inspect
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

from ._address import DEFAULT_HOST, DEFAULT_PORT, Address
from ._adopt import start_server
from ._appspec import NotImported
from ._config import ClusterConfig, default_start
from ._errors import AioclusterError, ConfigError
from ._logging import ensure_logging
from ._tracker import ConnectionTracker
from ._worker import become_worker, is_primary, is_worker, link, listen
from ._zygote import is_zygote, prefork_zygote, refuse, serve_forks

if TYPE_CHECKING:
    from aiohttp import web

    from ._primary import Cluster

__all__ = ["AppTarget", "create_server", "run", "serve", "supervise", "until_stopped"]

log = logging.getLogger("aiocluster")

AppFactory: TypeAlias = Callable[[], "web.Application | Awaitable[web.Application]"]
#: What ``serve`` accepts: an aiohttp Application, a factory returning one (sync or async),
#: or, with ``protocol=True``, an asyncio protocol factory.
AppTarget: TypeAlias = "web.Application | AppFactory | Callable[[], asyncio.BaseProtocol]"
PrimaryHook: TypeAlias = "Callable[[Cluster], Any]"


async def serve(
    app: AppTarget,
    *,
    protocol: bool = False,
    on_primary: PrimaryHook | None = None,
    access_log: bool = False,
    config: ClusterConfig | None = None,
    **options: Any,
) -> None:
    """Serve ``app`` on every worker of a cluster; the same call in both roles.

    In the primary: start the workers and supervise them until SIGINT/SIGTERM, then drain them;
    raises :class:`ClusterFailed` if the cluster cannot run (a bind error, an application that
    fails to start). ``on_primary`` is called with the :class:`Cluster` before the workers start,
    to subscribe to its events. SIGHUP reloads every worker; SIGTTIN/SIGTTOU add/remove one.

    In a worker: obtain the sockets from the primary and serve ``app`` on them until the
    primary says ``disconnect`` (or SIGTERM, or the primary dies), then drain: stop accepting,
    answer in-flight and follow-up requests with ``Connection: close``, for up to
    ``graceful_timeout`` seconds.

    ``options`` are those of :meth:`ClusterConfig.build` (``workers``, ``host``, ``port``,
    ``path``, ``bind``, ``graceful_timeout``, ``timeout``, ``max_requests``, ``policy``...); a
    ready-made ``config`` replaces them. With no address at all the cluster listens on
    127.0.0.1:8000.

    ``policy`` says who accepts connections: ``"shared"`` (every worker, on one socket; the
    default unless ``$AIOCLUSTER_POLICY`` names another), ``"rr"`` (the primary, handing each
    to a worker chosen by ``balance``, ``"round-robin"`` or ``"least-conn"``, or by client
    address with ``sticky``), or ``"reuseport"`` (Linux: one SO_REUSEPORT socket per worker
    slot). See docs/policies.md.
    """
    if is_zygote():
        refuse("aiocluster.serve() was awaited in the program's own event loop")
    if config is None:
        config = ClusterConfig.build(**options)
    if is_worker():
        if protocol:
            await _serve_protocol_worker(app, config)  # type: ignore[arg-type]
        else:
            await _serve_app_worker(app, config, access_log=access_log)
        return
    # aiohttp Applications are callable too: the primary need not import aiohttp to check.
    if not callable(app):
        raise ConfigError(f"cannot serve {app!r}: expected an aiohttp Application or a factory")
    await supervise(config, on_primary=on_primary)


async def supervise(
    config: ClusterConfig | None = None,
    *,
    on_primary: PrimaryHook | None = None,
    **options: Any,
) -> None:
    """Run the primary until it is stopped: the primary half of :func:`serve`.

    For programs that build their worker side by hand (``ClusterSite``, ``create_server``,
    :func:`until_stopped`). SIGINT/SIGTERM drain the workers; a second one stops at once.
    ``options`` are those of :meth:`ClusterConfig.build` when no ``config`` is given.
    """
    if is_zygote():
        refuse("aiocluster.supervise() was reached in the zygote")
    if is_worker():
        raise AioclusterError("supervise() runs the primary; this process is a worker")
    if config is None:
        config = ClusterConfig.build(**options)
    # Here, not at import: workers and the zygote never load the primary's modules.
    from ._operations import Operations
    from ._primary import Cluster

    ensure_logging()
    cluster = Cluster(config)
    if on_primary is not None:
        result = on_primary(cluster)
        if inspect.isawaitable(result):
            await result
    try:
        async with Operations(cluster) as operations:
            log.info("primary starting %d workers", config.workers)
            await cluster.start()
            operations.cluster_started()
            await cluster.wait()
            log.info("stopped")
    finally:
        await cluster.aclose()


async def resolve_app(target: AppTarget) -> web.Application:
    """The Application itself, or what a factory (sync or async) returns."""
    from aiohttp import web

    if isinstance(target, web.Application):
        return target
    if not callable(target):
        raise ConfigError(f"cannot serve {target!r}: expected an aiohttp Application or a factory")
    result: Any = target()
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, web.Application):
        raise ConfigError(
            f"the factory {getattr(target, '__qualname__', target)!r} returned "
            f"{type(result).__name__}, not an aiohttp Application (for an asyncio protocol "
            "factory pass protocol=True, or --protocol on the command line)"
        )
    return result


async def _serve_app_worker(target: AppTarget, config: ClusterConfig, *, access_log: bool) -> None:
    # Imported here: the primary, and workers serving bare protocols, never load aiohttp.
    from aiohttp import web

    from ._drain import drain_app
    from .web import ClusterSite

    current = link()
    runner: web.AppRunner | None = None

    async def start() -> None:
        nonlocal runner
        app = await resolve_app(target)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=current.graceful_timeout,
            access_log=logging.getLogger("aiohttp.access") if access_log else None,
        )
        await runner.setup()
        server = runner.server
        assert server is not None
        current.add_stats_source(lambda: (server.requests_count, len(server.connections)))
        for address in current.binds or config.binds:
            await ClusterSite(runner, address=address, backlog=config.backlog).start()

    with _stop_signals(current.stopping):
        await current.ensure_online()
        try:
            if await _start_unless_stopped(current.stopping, start()):
                await current.stopping.wait()
                assert runner is not None
                await drain_app(runner, current.graceful_timeout)
        finally:
            if runner is not None:
                await runner.cleanup()
    current.close()


async def _serve_protocol_worker(
    factory: Callable[[], asyncio.BaseProtocol], config: ClusterConfig
) -> None:
    if not callable(factory):
        raise ConfigError(f"cannot serve {factory!r}: a protocol factory must be callable")
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
            await tracker.drain(current.graceful_timeout)
    current.close()


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


def run(
    app: AppTarget,
    *,
    use_uvloop: bool = True,
    protocol: bool = False,
    on_primary: PrimaryHook | None = None,
    access_log: bool = False,
    config: ClusterConfig | None = None,
    **options: Any,
) -> None:
    """Run :func:`serve` to completion in a new event loop, like ``aiohttp.web.run_app``.

    Uses uvloop when it is installed and ``use_uvloop`` is true. Exits the process with status 1
    and a one-line error if the cluster cannot run.

    Workers start by ``config.start``: on Linux by default ``fork``, from a zygote forked here,
    before any event loop runs, that loads the application once; workers are forked from it
    and go on from this call as workers. ``start="spawn"`` starts each as a new interpreter.
    """
    ensure_logging()
    try:
        if config is None:
            config = ClusterConfig.build(**options)
        if is_zygote():
            app = _zygote(app, use_uvloop=use_uvloop, protocol=protocol)
        elif is_primary():
            if config.start is None:
                config = dataclasses.replace(config, start=default_start())
            if config.start == "fork" and prefork_zygote():
                app = _zygote(app, use_uvloop=use_uvloop, protocol=protocol)
        cluster = serve(
            app, protocol=protocol, on_primary=on_primary, access_log=access_log, config=config
        )
        _run_loop(cluster, use_uvloop=use_uvloop)
    except AioclusterError as err:
        log.error("%s", err)
        sys.exit(1)


def _zygote(app: AppTarget, *, use_uvloop: bool, protocol: bool) -> AppTarget:
    """In the zygote: load what workers run, then fork them; returns in each forked worker."""
    try:
        if isinstance(app, NotImported):
            app = app.load()
        # Loaded once here, shared by every worker's pages.
        if use_uvloop:
            with contextlib.suppress(ImportError):
                import uvloop  # noqa: F401
        if not protocol:
            from . import _drain, web  # noqa: F401
    except BaseException:
        log.exception("the zygote could not load the program")
        sys.stderr.flush()
        os._exit(1)
    become_worker(*serve_forks())
    return app


def _run_loop(coro: Coroutine[Any, Any, None], *, use_uvloop: bool) -> None:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            uvloop = None  # type: ignore[assignment]
        if uvloop is not None:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(coro)
            return
    asyncio.run(coro)
