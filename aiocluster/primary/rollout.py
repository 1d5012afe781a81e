"""Replacing workers without serving with fewer: rolling reloads and recycling.

A successor starts in the old worker's slot; only once it listens is the old one told to
drain. :class:`Rollout` owns the reload lock, so two reloads never interleave (one asked for
during another runs once more after it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiocluster.primary.priority import YIELD_NICE, Yielding
from aiocluster.primary.process import WorkerProcess

__all__ = ["Rollout"]

log = logging.getLogger("aiocluster.primary")


class Rollout:
    """Rolling reloads (``batch`` workers at a time) and the recycling of single workers.

    It asks the cluster through callables: ``renew()`` loads the program anew (False: it
    failed), ``serving()`` lists the workers that serve, ``spawn(slot, old)`` starts ``old``'s
    successor, ``refill(old)`` acts on the exit of ``old`` as if it had no successor,
    ``background(coro)`` runs a task for the cluster's life; ``stopped`` is set once a stop
    was asked for.
    """

    def __init__(
        self,
        batch: int,
        *,
        renew: Callable[[], Awaitable[bool]],
        serving: Callable[[], list[WorkerProcess]],
        spawn: Callable[[int, WorkerProcess], Awaitable[WorkerProcess]],
        refill: Callable[[WorkerProcess], None],
        background: Callable[[Coroutine[Any, Any, Any]], bool],
        stopped: asyncio.Event,
    ) -> None:
        #: Rolling reloads completed.
        self.reloads = 0
        self._batch = batch
        self._renew = renew
        self._serving = serving
        self._spawn = spawn
        self._refill = refill
        self._background = background
        self._stopped = stopped
        self._lock = asyncio.Lock()
        self._again = False
        self._yielding: Yielding | None = None

    async def reload(self) -> bool:
        """Replace every serving worker; True once all are replaced (see ``Cluster.reload``)."""
        if self._lock.locked():
            self._again = True  # a reload asked for during one: run once more after
            log.info("reload already in progress; another will follow it")
            return False
        async with self._lock:
            while True:
                self._again = False
                ok = await self._reload_once()
                if not ok or not self._again or self._stopped.is_set():
                    return ok

    @property
    def busy(self) -> bool:
        """True while a reload runs."""
        return self._lock.locked()

    def request_reload(self) -> None:
        """Start :meth:`reload` in the background."""
        if not self._stopped.is_set():
            self._run(self.reload())

    def retire(self, worker: WorkerProcess, reason: str) -> None:
        """Recycle ``worker`` (max requests, max memory) without losing a request."""
        if worker.retiring is None and worker.state == "listening":
            self._run(self.replace(worker, reason))

    async def replace(self, old: WorkerProcess, reason: str) -> bool:
        """Start a worker in ``old``'s slot; once it listens, drain ``old``. False if it fails."""
        stopping = self._stopped.is_set()
        if old.retiring is not None or old.state in ("disconnecting", "dead") or stopping:
            return old.state != "dead" or stopping
        old.retiring = reason
        log.info("replacing %s (%s): starting its successor", old.describe(), reason)
        new = await self._spawn(old.slot, old)
        listening = asyncio.create_task(new.wait_listening())
        exited = asyncio.create_task(new.wait())
        stop = asyncio.create_task(self._stopped.wait())
        await asyncio.wait({listening, exited, stop}, return_when=asyncio.FIRST_COMPLETED)
        for task in (listening, exited, stop):
            task.cancel()
        if not new.has_listened or self._stopped.is_set():
            old.retiring = None
            new.replaces = None
            if old.state == "dead" and not self._stopped.is_set():
                # The old worker died meanwhile and its successor failed: refill the slot.
                self._refill(old)
            return False
        new.replaces = None
        log.info("%s is listening; draining %s (%s)", new.describe(), old.describe(), reason)
        if self._yielding is not None:
            self._yielding.restore(old)
        old.disconnect()
        return True

    def _run(self, coro: Coroutine[Any, Any, Any]) -> None:
        if not self._background(coro):
            coro.close()  # the cluster has ended: nothing to replace any more

    async def _reload_once(self) -> bool:
        # The serving workers make room for the new program's load and their successors'
        # starts; each gets its priority back when it is told to drain (see priority.py).
        self._yielding = Yielding(self._serving())
        if self._yielding.count:
            log.info(
                "reload: %d serving workers run at nice +%d until each is told to drain",
                self._yielding.count,
                YIELD_NICE,
            )
        try:
            return await self._replace_all()
        finally:
            self._yielding.close()
            self._yielding = None

    async def _replace_all(self) -> bool:
        if not await self._renew():
            log.error("reload stopped: the program failed to load; the old workers keep serving")
            return False
        old = sorted(self._serving(), key=lambda w: w.slot)
        window = asyncio.Semaphore(self._batch)
        failed = False

        async def replace_in_window(worker: WorkerProcess) -> bool:
            # A sliding window, not lock-step batches: as soon as one successor listens (and
            # its old worker is told to drain) the next starts, so the drains of old workers
            # overlap the starts of the next successors and one slow start holds up no other.
            nonlocal failed
            async with window:
                if failed or self._stopped.is_set():
                    return False
                ok = await self.replace(worker, "reload")
                failed = failed or not ok
                return ok

        log.info("reload: replacing %d workers, %d at a time", len(old), self._batch)
        await asyncio.gather(*(replace_in_window(w) for w in old))
        if self._stopped.is_set():
            return False
        if failed:
            log.error("reload stopped: a new worker could not start; the old ones keep serving")
            return False
        self.reloads += 1
        log.info("reload complete: %d workers replaced", len(old))
        return True
