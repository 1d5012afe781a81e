"""``serve``, ``run`` and ``supervise``: the entry points, acting by role.

In the primary they start and supervise workers (:mod:`aiocluster.primary`, loaded only
there); in a worker they serve the application (:mod:`aiocluster.worker.serve`); in the
zygote ``run()`` loads the program and forks workers (:mod:`aiocluster._zygote`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from aiocluster._appspec import NotImported
from aiocluster._config import ClusterConfig, default_start
from aiocluster._errors import APP_ERROR_STATUS, AioclusterError, AppLoadError, ConfigError
from aiocluster._logging import ensure_logging, set_level
from aiocluster._options import run_settings
from aiocluster._process import account, apply_process_settings, drop_privileges
from aiocluster._role import become_worker
from aiocluster._title import primary_title, set_title, worker_title, zygote_title
from aiocluster._zygote import is_zygote, prefork_zygote, refuse, serve_forks
from aiocluster.worker.link import is_primary, is_worker
from aiocluster.worker.serve import AppTarget, serve_app_worker, serve_protocol_worker

if TYPE_CHECKING:
    from aiocluster.primary.cluster import Cluster

__all__ = ["exit_for_app_error", "run", "serve", "supervise"]

log = logging.getLogger("aiocluster")

PrimaryHook: TypeAlias = "Callable[[Cluster], Any]"


async def serve(
    app: AppTarget,
    *,
    protocol: bool = False,
    on_primary: PrimaryHook | None = None,
    access_log: bool | None = None,
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

    ``access_log`` None means ``$AIOCLUSTER_ACCESS_LOG``, else off.
    """
    if is_zygote():
        refuse("aiocluster.serve() was awaited in the program's own event loop")
    if config is None:
        config = ClusterConfig.build(**options)
    if is_worker():
        ensure_logging()
        if protocol:
            await serve_protocol_worker(app, config)  # type: ignore[arg-type]
        else:
            log_requests = run_settings(access_log=access_log)["access_log"]
            await serve_app_worker(app, config, access_log=log_requests)
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
    config = apply_process_settings(config)
    set_title(primary_title(config.name))
    # Here, not at import: workers and the zygote never load the primary's modules.
    from aiocluster.ops.operations import Operations
    from aiocluster.primary.cluster import Cluster

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


def run(
    app: AppTarget,
    *,
    use_uvloop: bool | None = None,
    protocol: bool = False,
    on_primary: PrimaryHook | None = None,
    access_log: bool | None = None,
    log_level: str | None = None,
    config: ClusterConfig | None = None,
    **options: Any,
) -> None:
    """Run :func:`serve` to completion in a new event loop, like ``aiohttp.web.run_app``.

    Uses uvloop when it is installed and ``use_uvloop`` is true. Exits the process with a
    one-line error: status 2 for a bad option, 1 if the cluster cannot run. ``use_uvloop``,
    ``access_log`` and ``log_level`` (the level of aiocluster's log handler, when the program
    set up none) left None come from ``$AIOCLUSTER_NO_UVLOOP``, ``$AIOCLUSTER_ACCESS_LOG`` and
    ``$AIOCLUSTER_LOG_LEVEL``, like the command line's.

    Workers start by ``config.start``: on Linux by default ``fork``, from a zygote forked here,
    before any event loop runs, that loads the application once; workers are forked from it
    and go on from this call as workers. ``start="spawn"`` starts each as a new interpreter.
    """
    try:
        own = run_settings(
            no_uvloop=None if use_uvloop is None else not use_uvloop,
            access_log=access_log,
            log_level=log_level,
        )
        set_level(own["log_level"])
        use_uvloop = not own["no_uvloop"]
        if config is None:
            config = ClusterConfig.build(**options)
        if is_zygote():
            app = _zygote(app, config, use_uvloop=use_uvloop, protocol=protocol)
        elif is_primary():
            config = apply_process_settings(config)
            if config.start is None:
                config = dataclasses.replace(config, start=default_start())
            if config.start == "fork" and prefork_zygote():
                app = _zygote(app, config, use_uvloop=use_uvloop, protocol=protocol)
        # After the zygote's fork and its import of the application: logging the
        # application configures at import wins over ours, in the zygote and every worker.
        ensure_logging()
        cluster = serve(
            app,
            protocol=protocol,
            on_primary=on_primary,
            access_log=own["access_log"],
            config=config,
        )
        _run_loop(cluster, use_uvloop=use_uvloop)
    except ConfigError as err:
        if isinstance(err, AppLoadError) and not is_primary():
            exit_for_app_error(err)
        sys.stderr.write(f"aiocluster: error: {err}\n")
        sys.exit(2)
    except AioclusterError as err:
        ensure_logging()
        log.error("%s", err)
        sys.exit(1)


def _zygote(
    app: AppTarget, config: ClusterConfig, *, use_uvloop: bool, protocol: bool
) -> AppTarget:
    """In the zygote: load what workers run, then fork them; returns in each forked worker."""
    set_title(zygote_title(config.name))
    try:
        # Before the application is loaded: under --user it never runs as root.
        drop_privileges(account(config.user, config.group))
        if isinstance(app, NotImported):
            app = app.load()
        ensure_logging()
        # Loaded once here, shared by every worker's pages.
        if use_uvloop:
            with contextlib.suppress(ImportError):
                import uvloop  # noqa: F401
        if not protocol:
            from aiocluster import web  # noqa: F401
            from aiocluster.worker import drain  # noqa: F401
    except AppLoadError as err:
        exit_for_app_error(err)
    except BaseException:
        ensure_logging()
        log.exception("the zygote could not load the program")
        sys.stderr.flush()
        os._exit(1)
    worker_id, slot, channel_fd = serve_forks()
    become_worker(worker_id, slot, channel_fd)
    set_title(worker_title(worker_id, slot, config.name))
    return app


def exit_for_app_error(err: AppLoadError) -> NoReturn:
    """In a worker or the zygote: say once what is wrong with the application, and exit.

    The exit status tells the primary that retrying cannot help (see :class:`AppLoadError`).
    The traceback is shown when the application itself raised (an error at its import).
    """
    if err.__cause__ is not None:
        traceback.print_exception(err.__cause__)
    sys.stderr.write(f"aiocluster: error: {err}\n")
    sys.stderr.flush()
    os._exit(APP_ERROR_STATUS)


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
