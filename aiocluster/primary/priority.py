"""The serving workers make room for a reload's new program: its load and its workers' starts.

A reload loads the program once, in a new zygote, while the old workers go on serving. On a
busy machine the scheduler shares the CPU among runnable processes: with eight workers
saturated, the one zygote gets about a ninth of the cluster's share, and its load (a fresh
interpreter importing the framework, ~250 ms of CPU for aiohttp) takes seconds. gunicorn's HUP
starts every new worker at once, which wins that share by numbers. Here the old workers' nice
value is raised by :data:`YIELD_NICE` while the zygote loads and their successors start: both
run at once, and the old workers serve meanwhile (more slowly, not less). Each old worker is
set back when it is told to drain, so that it finishes its requests at its own priority.

Lowering a nice value again needs privilege: ``CAP_SYS_NICE`` (root, though not root in a
Docker container by default), or an ``RLIMIT_NICE`` that allows it (systemd's ``LimitNICE=``).
Without it nothing is changed at all: a worker left with a raised nice value for the rest of
its life would be a surprise.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Iterable

from aiocluster.primary.process import WorkerProcess

__all__ = ["YIELD_NICE", "Yielding", "can_restore"]

log = logging.getLogger("aiocluster.primary")

#: How far the old workers' nice value is raised while the new program loads: at 10 a worker
#: weighs about a tenth of a nice-0 process, so the zygote gets most of the cluster's share.
YIELD_NICE = 10


#: The capability that allows lowering a nice value (linux/capability.h).
_CAP_SYS_NICE = 23


def can_restore(nice: int) -> bool:
    """True if this process may set a process of its user back to ``nice`` after raising it."""
    if _may_renice_freely():
        return True
    limit = getattr(resource, "RLIMIT_NICE", None)  # Linux only
    if limit is None:
        return False
    soft, _hard = resource.getrlimit(limit)
    # RLIMIT_NICE's unit: a nice value of n is allowed while 20 - n <= the limit.
    return soft == resource.RLIM_INFINITY or 20 - nice <= soft


def _may_renice_freely() -> bool:
    # Root in a container often lacks CAP_SYS_NICE (Docker's default set has it not): the
    # effective capabilities say, where /proc has them; elsewhere root may.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    except OSError:
        pass
    return os.geteuid() == 0


class Yielding:
    """The nice value of some workers, raised by :data:`YIELD_NICE` until each is set back.

    Made when a reload begins: the serving workers make room for the new zygote's load and
    for their successors' starts. Each is set back (:meth:`restore`) when it is told to drain,
    so that it finishes its requests at its own priority; :meth:`close` sets back the rest.
    Nothing is changed where the change could not be undone (see the module).
    """

    def __init__(self, workers: Iterable[WorkerProcess]) -> None:
        self._changed: dict[WorkerProcess, tuple[int, int]] = {}
        for worker in workers:
            pid = worker.pid
            if pid is None or worker.is_dead():
                continue
            try:
                nice = os.getpriority(os.PRIO_PROCESS, pid)
                target = min(19, nice + YIELD_NICE)
                if target == nice or not can_restore(nice):
                    continue
                os.setpriority(os.PRIO_PROCESS, pid, target)
            except OSError:  # gone already, or not ours to change
                continue
            self._changed[worker] = (pid, nice)

    @property
    def count(self) -> int:
        """How many workers are at the raised nice value now."""
        return len(self._changed)

    def restore(self, worker: WorkerProcess) -> None:
        """Set ``worker`` back to its own nice value, unless it exited meanwhile (its pid may
        be another process's by then); nothing if it was not changed."""
        changed = self._changed.pop(worker, None)
        if changed is None:
            return
        pid, nice = changed
        if worker.is_dead() or worker.pid != pid:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except ProcessLookupError:
            pass
        except OSError as err:
            log.warning("could not set the nice value of %s back: %s", worker.describe(), err)

    def close(self) -> None:
        """Set back every worker not set back yet."""
        for worker in list(self._changed):
            self.restore(worker)
