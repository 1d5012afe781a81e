"""What the primary does when a worker exits: the supervisor's verdict, carried out.

:mod:`aiocluster.primary.supervisor` decides (ignore, drain a ``reuseport`` slot, restart
after a back-off, halt); this module gathers the facts it decides on, acts on the verdict,
counts the restarts per slot, and says once what a worker reported wrong with the application.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aiocluster._config import ClusterConfig
from aiocluster._errors import AppErrorReport
from aiocluster.primary.fleet import Fleet
from aiocluster.primary.process import WorkerProcess
from aiocluster.primary.supervisor import ExitFacts, Supervisor

__all__ = ["Recovery"]

log = logging.getLogger("aiocluster.primary")


class Recovery:
    """Carries out the supervisor's verdict on every worker exit.

    ``size()`` is how many workers the cluster keeps; ``stop`` is set once a stop was asked
    for, ``ready`` once the cluster first served; ``drain_slot(slot)`` hands a retired
    ``reuseport`` slot's queue over; ``fail(reason, status)`` halts the cluster; ``background``
    runs a task for the cluster's life (False once it has ended).
    """

    def __init__(
        self,
        config: ClusterConfig,
        supervisor: Supervisor,
        fleet: Fleet,
        *,
        size: Callable[[], int],
        stop: asyncio.Event,
        ready: asyncio.Event,
        drain_slot: Callable[[int], int],
        fail: Callable[[str, int], None],
        background: Callable[[Coroutine[Any, Any, None]], bool],
    ) -> None:
        #: Restarts after crashes (and hangs), per slot.
        self.restarts: collections.Counter[int] = collections.Counter()
        self._config = config
        self._supervisor = supervisor
        self._fleet = fleet
        self._size = size
        self._stop = stop
        self._ready = ready
        self._drain_slot = drain_slot
        self._fail = fail
        self._background = background
        self._app_error_said = False
        self._app_error_logged: AppErrorReport | None = None

    def exited(self, worker: WorkerProcess, returncode: int) -> None:
        """``worker`` exited with ``returncode``: do what the supervisor says."""
        verdict = self._supervisor.decide(self._exit_facts(worker, returncode))
        if verdict.drain_slot:
            handed = self._drain_slot(worker.slot)
            log.info(
                "slot %d retired: %d queued connections handed to other workers",
                worker.slot,
                handed,
            )
        if verdict.action == "halt" and verdict.status == 2:
            self.app_error(worker.app_error)
        elif (
            worker.app_error is not None
            and worker.app_error != self._app_error_logged
            and not self._stop.is_set()  # the halt said it already, or nobody waits for it
        ):
            # A boot that failed once the cluster served (a reload into broken code, a
            # restart of new code): the cluster goes on, so the report is a log line.
            self._app_error_logged = worker.app_error
            log.error("%s reported:\n%s", worker.describe(), worker.app_error.text().rstrip())
        if verdict.action == "halt":
            self._fail(verdict.message, verdict.status)
            return
        log.log(verdict.level, "%s", verdict.message)
        if verdict.action == "restart":
            restart = self._restart(worker.slot, verdict.delay)
            if not self._background(restart):
                restart.close()
                raise AssertionError("a worker exited after the cluster ended")

    def app_error(self, report: AppErrorReport | None) -> None:
        """Say, once, what a worker or the zygote reported wrong with the application."""
        if report is not None and not self._app_error_said:
            self._app_error_said = True
            sys.stderr.write(report.text())
            sys.stderr.flush()

    def _exit_facts(self, worker: WorkerProcess, returncode: int) -> ExitFacts:
        return ExitFacts(
            name=worker.describe(),
            returncode=returncode,
            slot=worker.slot,
            listened=worker.has_listened,
            uptime=asyncio.get_running_loop().time() - worker.started_at,
            size=self._size(),
            stopping=self._stop.is_set(),
            expected=worker.exited_after_disconnect,
            retiring=worker.retiring is not None,
            replacing=worker.replaces.describe() if worker.replaces is not None else None,
            slot_taken=self._fleet.slot_taken(worker.slot),
            slot_served=self._fleet.slot_served(worker.slot),
            reuseport=self._config.policy == "reuseport",
            ready_once=self._ready.is_set(),
            faulted=worker.faulted,
            others_listening=self._fleet.listening(),
        )

    async def _restart(self, slot: int, delay: float) -> None:
        if delay:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
        if self._stop.is_set() or slot > self._size() or self._fleet.slot_served(slot):
            return
        self.restarts[slot] += 1
        await self._fleet.spawn(slot)
