"""The primary: starts workers, supervises them, and answers their channel requests.

The primary never serves the application. It runs one asyncio loop, one task per worker that
waits for the process to exit, and answers each worker's frames as they arrive; what concerns
the listening sockets (``queryServer``, policy rr's accepting) is :mod:`aiocluster.primary.listens`,
and what follows a worker's exit :mod:`aiocluster.primary.recovery`'s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import Coroutine
from typing import Any

from aiocluster._config import ClusterConfig
from aiocluster._errors import AioclusterError, ChannelClosed, ClusterFailed, ConfigError
from aiocluster._process import Account, account
from aiocluster.primary.dispatch import Dispatcher
from aiocluster.primary.events import EVENTS, Callback, Event, Events
from aiocluster.primary.fleet import Fleet
from aiocluster.primary.listens import Listens, Phase
from aiocluster.primary.metrics import MetricsStore
from aiocluster.primary.process import WorkerProcess
from aiocluster.primary.recovery import Recovery
from aiocluster.primary.rollout import Rollout
from aiocluster.primary.snapshot import Totals, snapshot
from aiocluster.primary.starter import AppUnloadable, ForkedProcess, Starter, worker_argv
from aiocluster.primary.supervisor import (
    RestartPolicy,
    Supervisor,
)
from aiocluster.primary.upgrade_state import UpgradeState, render_config
from aiocluster.wire import messages as proto
from aiocluster.wire.address import Address
from aiocluster.wire.sockets import inherited_socket

__all__ = ["EVENTS", "Cluster", "ClusterFailed", "Event"]

#: Seconds the first forked worker starts alone before the others (see Cluster._first_serves):
#: a forked aiohttp worker listens ~15 ms after its fork.
FIRST_WORKER_HEAD_START = 0.25

log = logging.getLogger("aiocluster.primary")


class Cluster:
    """A running cluster of worker processes, seen from the primary.

    Use it as an async context manager, or call :meth:`start` and later :meth:`aclose`::

        async with aiocluster.Cluster(config) as cluster:
            cluster.on("exit", lambda worker, code: print(worker.id, code))
            await cluster.wait()

    Events (Node's names), with the callback's arguments: ``fork(worker)``,
    ``online(worker)``, ``listening(worker, address)``, ``disconnect(worker)``,
    ``exit(worker, returncode)``, ``message(worker, data)``. Callbacks may be plain functions or
    coroutine functions; an exception in one is logged and never stops the cluster.

    Supervision: a worker that dies is replaced (with backoff if it keeps dying); one whose event
    loop stops sending heartbeats for ``config.timeout`` seconds has its stack dumped and is
    killed; :meth:`reload` replaces every worker without ever serving with fewer than
    :attr:`size`; :meth:`scale` changes :attr:`size`.
    """

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        #: Who the zygote and the workers run as (``--user``/``--group``; None: as we do).
        self.account: Account | None = account(config.user, config.group)
        #: The listening sockets, and which workers serve each (policy rr: the balancer).
        self.listens = Listens(
            config,
            phase=self._phase,
            fail=self._fail,
            background=self._background,
            counted=lambda worker_id, total: self.fleet.count_accepted(worker_id, total),
            configured=lambda: self.binds,
            restricted_to=self.account if self.account and self.account.uid != 0 else None,
        )
        #: Starts worker processes: forks of a zygote, or fresh interpreters.
        self.starter = Starter(
            config.start or "spawn",
            list(config.argv) if config.argv else worker_argv(),
            self.account,
        )
        self._size = config.workers
        #: What workers listen on: the configured binds, or the sockets systemd passed.
        self.binds: list[Address] = list(config.binds)
        #: What exited workers had counted, so the cluster's totals never go backwards.
        self.totals = Totals()
        #: The workers' own metrics (their applications' registries, their request metrics).
        self.metrics = MetricsStore()
        self.started_at = asyncio.get_running_loop().time()
        #: Wall-clock times: the primary's first start, and this image's (after an upgrade).
        self.started = self.code_started = time.time()
        #: In-place upgrades of the primary so far (the pid stays; see primary/upgrade.py).
        self.upgrades = 0
        self._restored: UpgradeState | None = None
        self._supervisor = Supervisor(RestartPolicy())
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._ready = asyncio.Event()
        self._failure: str | None = None
        self._failure_status = 1
        self._main: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._events = Events(self._background)
        self._build_parts(config)

    def _build_parts(self, config: ClusterConfig) -> None:
        # The parts that call back into the cluster, built once its own state exists.
        #: The live worker processes; :attr:`workers` maps their ids to them.
        self.fleet = Fleet(
            config,
            self.starter,
            self.listens,
            self._events,
            dispatch=lambda worker, frame: self.dispatcher.dispatch(worker, frame),
            background=self._background,
            exited=self._exited,
            stopped=self._stop,
        )
        #: Live workers by id.
        self.workers: dict[int, WorkerProcess] = self.fleet.workers
        #: Acts on every worker exit: restart, drain its slot, halt.
        self.recovery = Recovery(
            config,
            self._supervisor,
            self.fleet,
            size=lambda: self._size,
            stop=self._stop,
            ready=self._ready,
            drain_slot=self.drain_slot,
            fail=self._fail,
            background=self._background,
        )
        #: Restarts after crashes (and hangs), per slot.
        self.restarts: collections.Counter[int] = self.recovery.restarts
        #: Replaces workers without serving with fewer: reloads, recycling.
        self.rollout = Rollout(
            config.reload_batch,
            renew=self.starter.renew,
            serving=self.fleet.serving,
            spawn=self.fleet.spawn,
            refill=self._refill,
            background=self._background,
            stopped=self._stop,
        )
        #: Answers every worker's frames (``dispatch(worker, frame)``).
        self.dispatcher = Dispatcher(
            config,
            self.listens,
            self._events,
            binds=lambda: self.binds,
            listened=self._listened,
            retire=self.rollout.retire,
            metrics=self.metrics,
        )

    # -- public API --------------------------------------------------------------------------

    def on(self, event: Event, callback: Callback) -> None:
        """Call ``callback`` on every ``event`` (see the class docstring for the arguments)."""
        self._events.on(event, callback)

    async def start(self) -> None:
        """Start the workers; returns at once (see :meth:`wait_ready` and :meth:`wait`)."""
        if self._main is not None:
            raise AioclusterError("the cluster is already started")
        self._main = asyncio.create_task(self._run(), name="aiocluster-primary")

    async def wait_ready(self) -> None:
        """Wait until every worker is listening (raises :class:`ClusterFailed` if it never is)."""
        assert self._main is not None, "start() the cluster first"
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait({ready, self._main}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._ready.is_set():
            await self._main
            raise ClusterFailed(
                self._failure or "the cluster stopped before it was ready", self._failure_status
            )

    def adopt_listeners(self, socks: list[socket.socket]) -> None:
        """Serve these listening sockets (socket activation) instead of binding ``config.binds``."""
        if socks:
            self.binds = [self.listens.handles.adopt(sock) for sock in socks]
            for address in self.binds:
                log.info("listening on %s (passed by the service manager)", address)

    def status(self) -> dict[str, Any]:
        """A snapshot of the cluster for ``aiocluster status`` and the admin endpoint."""
        return snapshot(self, asyncio.get_running_loop().time())

    def is_ready(self) -> bool:
        """True while at least :attr:`size` workers are listening and no stop was asked for."""
        return self.fleet.listening() >= self._size and not self.stopping

    @property
    def size(self) -> int:
        """How many workers the cluster keeps serving (see :meth:`scale`)."""
        return self._size

    def scale(self, size: int) -> None:
        """Serve with ``size`` workers: start new ones, or drain the highest slots gracefully."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"a cluster needs at least 1 worker, not {size!r}")
        if self._tg is None or self.stopping:
            raise AioclusterError("the cluster is not running")
        log.info("scaling from %d to %d workers", self._size, size)
        self._size = size
        for slot in self.fleet.resize(size, forget=self._supervisor.forget):
            self._tg.create_task(self.fleet.spawn(slot))

    async def reload(self) -> bool:
        """Replace every worker, ``config.reload_batch`` at a time; True once all are replaced.

        Each new worker must be listening before the one it replaces is told to drain, so the
        cluster never serves with fewer workers. If a new worker fails to start, the reload stops
        there and the remaining old workers keep serving (returns False).
        """
        return await self.rollout.reload()

    def request_reload(self) -> None:
        """Start :meth:`reload` in the background (what SIGHUP does)."""
        self.rollout.request_reload()

    @property
    def reloads(self) -> int:
        """Rolling reloads completed."""
        return self.rollout.reloads

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for (a second :meth:`stop` then forces it)."""
        return self._stop.is_set()

    def stop(self, *, force: bool = False) -> None:
        """Ask the cluster to stop: gracefully, or at once with ``force`` (SIGKILL to all).

        Safe to call from a signal handler callback; calling it twice forces the stop.
        """
        if force or self._stop.is_set():
            self._force.set()
        self._stop.set()

    async def wait(self) -> None:
        """Wait until the cluster has stopped; raise :class:`ClusterFailed` if it failed."""
        assert self._main is not None, "start() the cluster first"
        await asyncio.shield(self._main)
        if self._failure is not None:
            raise ClusterFailed(self._failure, self._failure_status)

    async def aclose(self) -> None:
        """Stop gracefully and wait until every worker is reaped and every socket closed."""
        if self._main is None:
            self.listens.close()
            return
        self._stop.set()
        await asyncio.shield(self._main)

    async def __aenter__(self) -> Cluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- in-place upgrade ------------------------------------------------------------------

    def handover(self, argv: list[str]) -> UpgradeState:
        """The cluster's whole state for its new image (``argv``: what will be executed).

        The operator-facing fields (control socket, admin, systemd) are left for
        :mod:`aiocluster.ops` to fill in; see :mod:`aiocluster.primary.upgrade`.
        """
        handles, ids, pinned = self.listens.handles.export()
        balancer = self.listens.balancer
        workers = [
            worker.handover(balancer.groups_of(worker.id))
            for worker in sorted(self.workers.values(), key=lambda w: w.id)
        ]
        zygote = self.starter.zygote
        taken = zygote.handover() if zygote is not None else None
        return UpgradeState(
            written_by=_version(),
            upgrades=self.upgrades + 1,
            argv=tuple(argv),
            config=render_config(self.config),
            started=self.started,
            size=self._size,
            next_worker_id=self.fleet.next_id,
            reloads=self.rollout.reloads,
            binds=tuple(self.binds),
            handles=tuple(handles),
            listen_ids=tuple(ids),
            pinned=tuple(pinned),
            workers=tuple(workers),
            start_method=self.starter.method,
            zygote_pid=taken[0] if taken else None,
            zygote_channel=taken[1] if taken else None,
            boot_failures=self._supervisor.boot_failures,
            streaks=dict(self._supervisor.streaks),
            restarts=dict(self.restarts),
            retired=self.totals.export(),
            accepted=dict(balancer.accepted),
            served=self.starter.has_served,
        )

    def restore(self, state: UpgradeState) -> None:
        """Before :meth:`start`: carry on from ``state`` (the old image's) instead of starting
        workers: the same workers, sockets, zygote and history, around inherited descriptors."""
        if self._main is not None:
            raise AioclusterError("restore() comes before start()")
        self._restored = state
        self._size = state.size
        self.binds = list(state.binds)
        self.upgrades = state.upgrades
        self.started = state.started
        self.started_at -= max(0.0, time.time() - state.started)
        self.rollout.reloads = state.reloads
        self._supervisor.boot_failures = state.boot_failures
        self._supervisor.streaks.update(state.streaks)
        self.restarts.update(state.restarts)
        self.totals.restore(state.retired)
        self.listens.restore(list(state.handles), list(state.listen_ids), list(state.pinned))
        self.listens.balancer.accepted.update(state.accepted)
        self.starter.method = "fork" if state.start_method == "fork" else "spawn"
        if state.served:
            self.starter.served()
        if state.zygote_pid is not None and state.zygote_channel is not None:
            self.starter.adopt_zygote(state.zygote_pid, state.zygote_channel)

    def _resume(self, state: UpgradeState) -> None:
        # In the task group: every worker gets its watch task, as a started one does.
        for record in state.workers:
            sock = inherited_socket(record.channel.fd)
            worker = self.fleet.adopt(record, ForkedProcess(record.pid), sock)
            channel = worker.channel
            assert channel is not None
            self.listens.rejoin(worker, record.groups)
            with contextlib.suppress(ChannelClosed):
                channel.send(
                    {"act": proto.UPGRADED, "version": _version(), "upgrades": self.upgrades}
                )
        log.info(
            "upgraded in place to aiocluster %s: carrying on with %d workers (upgrade %d)",
            _version(),
            len(state.workers),
            self.upgrades,
        )
        self._check_ready()

    # -- supervision -------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                if self._restored is not None:
                    self._resume(self._restored)  # the old image's workers carry on
                else:
                    await self._start_workers()
                await self._stop.wait()
                await self._shutdown()
        finally:
            self._tg = None
            self.listens.close()
            await self.starter.aclose()

    async def _start_workers(self) -> None:
        for slot in range(1, self._size + 1):
            if self.stopping:
                break  # stopped while the first workers started: start no more
            try:
                worker = await self.fleet.spawn(slot)
            except AppUnloadable as err:
                self.recovery.app_error(err.report)
                self._fail(f"{err}; stopping the cluster", status=2)
                break
            if slot == 1 and self._size > 1 and self.starter.method == "fork":
                await self._first_serves(worker)

    async def _first_serves(self, worker: WorkerProcess) -> None:
        """Until the first forked worker listens (or exits, or the cluster stops), at most
        :data:`FIRST_WORKER_HEAD_START` seconds: the next forks and start-ups would take the
        CPU it needs to give the first answer. Bounded, so that an application with a slow
        ``on_startup`` still starts its workers side by side."""
        waits = [
            asyncio.ensure_future(worker.wait_listening()),
            asyncio.ensure_future(worker.wait()),
            asyncio.ensure_future(self._stop.wait()),
        ]
        try:
            await asyncio.wait(
                waits, timeout=FIRST_WORKER_HEAD_START, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiting in waits:
                waiting.cancel()

    def _exited(self, worker: WorkerProcess, returncode: int) -> None:
        # What it counted stays in the cluster's totals; then the supervisor's verdict.
        self.totals.retire(worker)
        self.metrics.retire(worker.id)
        self.recovery.exited(worker, returncode)

    def _refill(self, worker: WorkerProcess) -> None:
        """``worker`` died while its successor failed to start: its slot needs a worker.

        Its counts were retired when it exited: only the verdict is asked for again."""
        if self._tg is not None:
            self.recovery.exited(worker, worker.returncode or 0)

    def _fail(self, reason: str, status: int = 1) -> None:
        if self._failure is None:
            self._failure = reason
            self._failure_status = status
            log.error("%s", reason)
        self._stop.set()

    async def _shutdown(self) -> None:
        if await self.fleet.shut_down(self._force):
            self._fail("stop forced: workers were killed without draining")

    # -- scheduling policies -----------------------------------------------------------------

    def drain_slot(self, slot: int) -> int:
        """Scale down under policy reuseport: serve what ``slot``'s sockets queued, close them.

        Call it once the slot's worker has exited (disconnect it, await ``worker.wait()``) and
        no replacement will take the slot. The primary accepts the connections the kernel
        had queued on the slot's SO_REUSEPORT sockets, hands them to the other workers, and
        closes the sockets; returns how many it handed over. Under other policies: 0.
        """
        if self.fleet.slot_taken(slot):
            raise AioclusterError(
                f"slot {slot} still has a worker: disconnect it and wait for its exit first"
            )
        return self.listens.drain_slot(slot)

    def _listened(self, worker: WorkerProcess) -> None:
        self._supervisor.listening()
        self._check_ready()

    def _check_ready(self) -> None:
        listening = self.fleet.listening()
        if not self._ready.is_set() and listening >= self._size:
            self._ready.set()
            self.starter.served()
            log.info("ready: %d workers listening", listening)

    def _phase(self) -> Phase:
        if self.stopping:
            return "stopping"
        return "serving" if self._ready.is_set() else "starting"

    def _background(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> bool:
        """Run ``coro`` for the cluster's life; False (not run) once the cluster has stopped."""
        if self._tg is None:
            return False
        self._tg.create_task(coro, name=name)
        return True


def _version() -> str:
    """The aiocluster version this image runs (the package as it is installed now)."""
    from aiocluster import __version__

    return __version__
