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
import socket
import ssl
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from aiocluster._appspec import NotImported
from aiocluster._config import ClusterConfig, default_start
from aiocluster._errors import (
    APP_ERROR_STATUS,
    AioclusterError,
    AppErrorReport,
    AppLoadError,
    ClusterFailed,
    ConfigError,
)
from aiocluster._kinds import INTERFACES, Interface, classify
from aiocluster._logging import ensure_logging, set_level
from aiocluster._options import default_workers, run_settings
from aiocluster._process import account, apply_process_settings, drop_privileges
from aiocluster._role import become_worker, identity
from aiocluster._title import primary_title, set_title, worker_title, zygote_title
from aiocluster._tls import check_tls
from aiocluster._zygote import is_zygote, prefork_zygote, refuse, serve_forks
from aiocluster.wire import messages as proto
from aiocluster.wire.codec import encode
from aiocluster.worker.link import is_primary, is_worker
from aiocluster.worker.serve import (
    AppTarget,
    asgi_support,
    serve_app_worker,
    serve_protocol_worker,
)

if TYPE_CHECKING:
    from aiocluster.primary.cluster import Cluster

__all__ = ["exit_for_app_error", "run", "serve", "supervise"]

log = logging.getLogger("aiocluster")

PrimaryHook: TypeAlias = "Callable[[Cluster], Any]"


async def serve(
    app: AppTarget,
    *,
    interface: Interface = "auto",
    protocol: bool = False,
    on_primary: PrimaryHook | None = None,
    access_log: bool | None = None,
    ssl_context: ssl.SSLContext | None = None,
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

    ``app`` is an aiohttp Application, an ASGI 3 application (Starlette, FastAPI...: served
    with uvicorn's protocols, ``pip install 'aiocluster[asgi]'``), or a factory returning
    either (sync or async); ``interface`` (``"auto"``, ``"aiohttp"``, ``"asgi"``,
    ``"protocol"``) says which instead of looking at it; ``"protocol"`` (or ``protocol=True``)
    serves an asyncio protocol factory.

    ``access_log`` None means ``$AIOCLUSTER_ACCESS_LOG``, else off.

    TLS: ``certfile`` and ``keyfile`` (options), which each new worker reads afresh, or a ready
    ``ssl_context`` (as ``web.run_app`` takes), used as it is.
    """
    if is_zygote():
        refuse("aiocluster.serve() was awaited in the program's own event loop")
    interface = _interface(interface, protocol=protocol)
    if config is None:
        config = ClusterConfig.build(**options)
    own = run_settings(access_log=access_log, ssl_context=ssl_context)
    if is_worker():
        ensure_logging()
        tls = own["ssl_context"]
        if interface == "protocol":
            await serve_protocol_worker(app, config, ssl_context=tls)  # type: ignore[arg-type]
        else:
            await serve_app_worker(
                app, config, access_log=own["access_log"], interface=interface, ssl_context=tls
            )
        return
    # aiohttp Applications are callable too: the primary need not import aiohttp to check.
    if not callable(app):
        raise ConfigError(f"cannot serve {app!r}: expected an aiohttp Application or a factory")
    check_tls(config, own["ssl_context"])
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
    from aiocluster.primary.upgrade import read_state

    ensure_logging()
    cpus = default_workers()
    if config.workers > 4 * cpus:
        log.warning(
            "%d workers for %d CPUs: more than 4 per CPU only adds memory and context switches; "
            "one per CPU is usually best",
            config.workers,
            cpus,
        )
    # The new image of an in-place upgrade carries on from the old one's state (same pid).
    resumed = read_state()
    cluster = Cluster(config)
    if resumed is not None:
        cluster.restore(resumed)
    if on_primary is not None:
        result = on_primary(cluster)
        if inspect.isawaitable(result):
            await result
    try:
        async with Operations(cluster, resumed) as operations:
            if resumed is None:
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
    interface: Interface = "auto",
    protocol: bool = False,
    on_primary: PrimaryHook | None = None,
    access_log: bool | None = None,
    log_level: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    config: ClusterConfig | None = None,
    **options: Any,
) -> None:
    """Run :func:`serve` to completion in a new event loop, like ``aiohttp.web.run_app``.

    Uses uvloop when it is installed and ``use_uvloop`` is true. Exits the process with a
    one-line error: status 2 for a bad option, 1 if the cluster cannot run. ``use_uvloop``,
    ``access_log`` and ``log_level`` (the level of aiocluster's log handler, when the program
    set up none) left None come from ``$AIOCLUSTER_NO_UVLOOP``, ``$AIOCLUSTER_ACCESS_LOG`` and
    ``$AIOCLUSTER_LOG_LEVEL``, like the command line's.

    ``ssl_context``: a ready :class:`ssl.SSLContext` for every listen (as ``web.run_app``
    takes), instead of the ``certfile``/``keyfile`` options, which each new worker reads
    afresh.

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
        interface = _interface(interface, protocol=protocol)
        use_uvloop = not own["no_uvloop"]
        if config is None:
            config = ClusterConfig.build(**options)
        app, config = _before_loop(
            app, config, ssl_context, use_uvloop=use_uvloop, interface=interface
        )
        # After the zygote's fork and its import of the application: logging the
        # application configures at import wins over ours, in the zygote and every worker.
        ensure_logging()
        cluster = serve(
            app,
            interface=interface,
            on_primary=on_primary,
            access_log=own["access_log"],
            ssl_context=ssl_context,
            config=config,
        )
        _run_loop(cluster, use_uvloop=use_uvloop)
    except ConfigError as err:
        if isinstance(err, AppLoadError) and not is_primary():
            exit_for_app_error(err)
        sys.stderr.write(f"aiocluster: error: {err}\n")
        sys.exit(2)
    except ClusterFailed as err:
        sys.exit(err.status)  # the cluster logged why, once
    except AioclusterError as err:
        ensure_logging()
        log.error("%s", err)
        sys.exit(1)


def _before_loop(
    app: AppTarget,
    config: ClusterConfig,
    ssl_context: ssl.SSLContext | None,
    *,
    use_uvloop: bool,
    interface: Interface,
) -> tuple[AppTarget, ClusterConfig]:
    """What :func:`run` does before any event loop runs: the primary's checks and process
    settings, and the fork of the zygote, which returns here as each forked worker."""
    if is_primary():
        # Before the zygote's fork: a bad file is one line and status 2.
        check_tls(config, run_settings(ssl_context=ssl_context)["ssl_context"])
    if is_zygote():
        app = _zygote(app, config, use_uvloop=use_uvloop, interface=interface)
    elif is_primary():
        config = apply_process_settings(config)
        if config.start is None:
            config = dataclasses.replace(config, start=default_start())
        if config.start == "fork" and prefork_zygote():
            app = _zygote(app, config, use_uvloop=use_uvloop, interface=interface)
    return app, config


def _interface(interface: Interface, *, protocol: bool) -> Interface:
    """``interface``, with ``protocol=True`` as the alias of ``"protocol"`` it is."""
    if interface not in INTERFACES:
        raise ConfigError(f"interface must be one of {', '.join(INTERFACES)}, not {interface!r}")
    if protocol:
        if interface not in ("auto", "protocol"):
            raise ConfigError(f"protocol=True and interface={interface!r} exclude each other")
        return "protocol"
    return interface


def _zygote(
    app: AppTarget, config: ClusterConfig, *, use_uvloop: bool, interface: Interface
) -> AppTarget:
    """In the zygote: load what workers run, then fork them; returns in each forked worker.

    What cannot be served (an ASGI 2 app, a synchronous callable, a missing extra) is found
    here, once, rather than by every worker.
    """
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
        if interface != "protocol":
            kind = classify(app)
            if kind == "asgi" or interface == "asgi":
                asgi_support()
            else:
                from aiocluster import web  # noqa: F401
                from aiocluster.worker import drain, proxy  # noqa: F401
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
    """In a worker or the zygote: report what is wrong with the application, and exit.

    The report goes to the primary, which says it once however many workers found the same
    (they boot in parallel); the exit status tells it that retrying cannot help (see
    :class:`AppLoadError`). The traceback is kept when the application itself raised.
    """
    cause = err.__cause__
    report = AppErrorReport(
        str(err)[: proto.MAX_ERROR_LINE],
        _app_traceback(cause)[-proto.MAX_TRACEBACK :] if cause else "",
    )
    if not _tell_primary(
        {"act": proto.APP_ERROR, "error": report.error, "traceback": report.traceback}
    ):
        sys.stderr.write(report.text())  # no primary to say it (or it is not listening)
    sys.stderr.flush()
    os._exit(APP_ERROR_STATUS)


def _app_traceback(error: BaseException) -> str:
    """``error``'s traceback without the frames of the import machinery and of aiocluster."""
    shown = traceback.TracebackException.from_exception(error)
    ours = os.path.dirname(os.path.abspath(__file__))
    shown.stack = traceback.StackSummary.from_list(
        [
            frame
            for frame in shown.stack
            if not frame.filename.startswith(("<frozen ", ours))
            and os.path.basename(os.path.dirname(frame.filename)) != "importlib"
        ]
    )
    return "".join(shown.format())


def _tell_primary(msg: dict[str, object]) -> bool:
    """Write one frame on this process's channel to the primary, blocking; False if it fails.

    Only for a process about to exit: the frame bypasses the channel's own queue.
    """
    fd = identity().channel_fd
    if fd is None:
        return False
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    with sock:
        sock.settimeout(2.0)
        try:
            sock.sendall(encode(msg))
        except OSError:
            return False
    return True


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
