"""The live worker processes: starting one, watching it until it exits, finding them by slot.

What to do once one exited (restart, halt, nothing) is :mod:`aiocluster.primary.recovery`'s,
told through the ``exited`` callback; which ones exist and how they came and went (started,
drained past a smaller size, all stopped) is this module's.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from aiocluster._config import ClusterConfig
from aiocluster.primary.events import Events
from aiocluster.primary.listens import Listens
from aiocluster.primary.process import WorkerProcess
from aiocluster.primary.starter import ProcessHandle, Starter
from aiocluster.primary.supervisor import free_slot, request_limit
from aiocluster.primary.upgrade_state import WorkerRecord
from aiocluster.wire.codec import Frame

__all__ = ["DRAIN_MARGIN", "Fleet", "drain_limit"]

#: Seconds a drained worker gets, past its deadline and cleanup allowance, to exit.
DRAIN_MARGIN = 1.0


def drain_limit(config: ClusterConfig) -> float:
    """How long a worker told to drain may take before the primary kills it."""
    return config.graceful_timeout + config.cleanup_timeout + DRAIN_MARGIN


log = logging.getLogger("aiocluster.primary")


class Fleet:
    """The cluster's live workers by id, each watched by a task until it exits.

    ``dispatch(worker, frame)`` answers a worker's frames; ``background(coro, name)`` runs a
    task for the cluster's life; ``exited(worker, returncode)`` hears each exit, once the
    worker is no longer counted live; ``stopped`` is set once a stop was asked for.
    """

    def __init__(
        self,
        config: ClusterConfig,
        starter: Starter,
        listens: Listens,
        events: Events,
        *,
        dispatch: Callable[[WorkerProcess, Frame], None],
        background: Callable[[Coroutine[Any, Any, None], str], bool],
        exited: Callable[[WorkerProcess, int], None],
        stopped: asyncio.Event,
    ) -> None:
        #: Live workers by id.
        self.workers: dict[int, WorkerProcess] = {}
        self._config = config
        self._starter = starter
        self._listens = listens
        self._events = events
        self._dispatch = dispatch
        self._background = background
        self._exited = exited
        self._stopped = stopped
        #: The id the next worker gets (ids are never reused in a cluster's life).
        self.next_id = 1
        self._gone = asyncio.Event()  # set while no worker process is alive
        self._gone.set()

    async def spawn(self, slot: int, replaces: WorkerProcess | None = None) -> WorkerProcess:
        """Start a worker in ``slot`` (``replaces``: the one it is to take over from)."""
        worker = self._new(self.next_id, slot)
        self.next_id += 1
        worker.replaces = replaces
        worker.request_limit = request_limit(
            self._config.max_requests, self._config.max_requests_jitter
        )
        process, sock = await self._starter.launch(worker.id, slot)
        worker.attach(process, sock, lambda frame: self._dispatch(worker, frame))
        self._register(worker)
        log.info("started %s", worker.describe())
        self._events.emit("fork", worker)
        self._watch_live(worker)
        if self._stopped.is_set():
            worker.disconnect()  # started while the cluster began to stop
        return worker

    def adopt(
        self, record: WorkerRecord, process: ProcessHandle, sock: socket.socket
    ) -> WorkerProcess:
        """After an in-place upgrade: watch the worker the old image ran, as it was."""
        worker = self._new(record.id, record.slot)
        worker.adopt(record, process, sock, lambda frame: self._dispatch(worker, frame))
        worker.arm_hang_timer(self._config.timeout)
        self.next_id = max(self.next_id, record.id + 1)
        self._register(worker)
        self._watch_live(worker)
        return worker

    def _new(self, worker_id: int, slot: int) -> WorkerProcess:
        return WorkerProcess(
            worker_id, slot, on_event=self._events.emit, drain_limit=drain_limit(self._config)
        )

    def _register(self, worker: WorkerProcess) -> None:
        self.workers[worker.id] = worker
        self._gone.clear()

    def _watch_live(self, worker: WorkerProcess) -> None:
        watching = self._watch(worker)
        if not self._background(watching, f"aiocluster-watch-{worker.id}"):
            watching.close()
            raise RuntimeError("a worker was started after the cluster ended")

    def serving(self) -> list[WorkerProcess]:
        """Workers that serve, or will: neither draining nor on their way out."""
        return [
            w
            for w in self.workers.values()
            if w.state not in ("disconnecting", "dead")
            and w.retiring is None
            and w.replaces is None
        ]

    def resize(self, size: int, *, forget: Callable[[int], None]) -> list[int]:
        """Drain the serving workers past ``size`` (highest slots first; ``forget(slot)`` each).

        Returns the free slots to start new workers in, to serve with ``size`` in all.
        """
        serving = sorted(self.serving(), key=lambda w: w.slot)
        for worker in serving[size:]:
            log.info("scaling down: draining %s (slot %d)", worker.describe(), worker.slot)
            forget(worker.slot)
            worker.disconnect()
        used = {w.slot for w in serving[:size]}
        slots = []
        for _ in range(size - len(serving)):
            slot = free_slot(used)
            used.add(slot)
            slots.append(slot)
        return slots

    def slot_taken(self, slot: int) -> bool:
        """True while a live worker has ``slot`` (serving or not)."""
        return any(w.slot == slot for w in self.workers.values())

    def slot_served(self, slot: int) -> bool:
        """True while a worker that serves (see :meth:`serving`) has ``slot``."""
        return any(w.slot == slot for w in self.serving())

    def listening(self) -> int:
        """How many workers are listening now."""
        return sum(1 for w in self.workers.values() if w.state == "listening")

    def count_accepted(self, worker_id: int, total: int) -> None:
        """Worker ``worker_id`` has accepted ``total`` connections (ignored once it is gone)."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.count_accepted(total)

    async def wait_gone(self) -> None:
        """Wait until no worker process is alive."""
        await self._gone.wait()

    async def shut_down(self, force: asyncio.Event) -> bool:
        """Drain every worker and wait until all are gone; kill them all once ``force`` is set.

        Returns True if the stop was forced: workers were killed without draining.
        """
        log.info(
            "stopping %d workers (graceful timeout %gs, cleanup %gs)",
            len(self.workers),
            self._config.graceful_timeout,
            self._config.cleanup_timeout,
        )
        # Each worker told to drain kills itself past its own drain limit (see spawn): no
        # second timeout here to stack on the first.
        for worker in list(self.workers.values()):
            worker.disconnect()
        # Our copies of the listening sockets go now: once the workers close theirs the
        # kernel stops queueing connections nobody would accept, and Unix socket files vanish.
        self._listens.close_sockets()
        gone = asyncio.create_task(self.wait_gone())
        forced = asyncio.create_task(force.wait())
        await asyncio.wait({gone, forced}, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if force.is_set():
            for worker in list(self.workers.values()):
                log.warning("killing %s: stop forced", worker.describe())
                worker.signal(signal.SIGKILL)
        await gone
        return force.is_set()

    async def _watch(self, worker: WorkerProcess) -> None:
        returncode = await worker.watch()
        self._listens.gone(worker)
        self.workers.pop(worker.id, None)
        if not self.workers:
            self._gone.set()
        self._events.emit("exit", worker, returncode)
        self._exited(worker, returncode)
