"""The serving workers make room for the new program's load, for as long as it takes.

A reload loads the program once, in a new zygote, while the old workers go on serving. On a
busy machine the scheduler shares the CPU among runnable processes: with eight workers
saturated, the one zygote gets about a ninth of the cluster's share, and its load (a fresh
interpreter importing the framework, ~250 ms of CPU for aiohttp) takes seconds. gunicorn's HUP
starts every new worker at once, which wins that share by numbers. Here the old workers' nice
value is raised by :data:`YIELD_NICE` while the zygote loads and set back as soon as it is
ready, so the load runs at once and the old workers serve meanwhile (more slowly, not less).

Lowering a nice value again needs privilege: root (``CAP_SYS_NICE``), or an ``RLIMIT_NICE``
that allows it (systemd's ``LimitNICE=``). Without it nothing is changed at all: a worker left
with a raised nice value for the rest of its life would be a surprise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from collections.abc import Iterator, Sequence

from aiocluster.primary.process import WorkerProcess

__all__ = ["YIELD_NICE", "can_restore", "yielding"]

log = logging.getLogger("aiocluster.primary")

#: How far the old workers' nice value is raised while the new program loads: at 10 a worker
#: weighs about a tenth of a nice-0 process, so the zygote gets most of the cluster's share.
YIELD_NICE = 10


def can_restore(nice: int) -> bool:
    """True if this process may set a process of its user back to ``nice`` after raising it."""
    if os.geteuid() == 0:
        return True  # CAP_SYS_NICE, as far as a check short of trying can tell
    soft, _hard = resource.getrlimit(resource.RLIMIT_NICE)
    # RLIMIT_NICE's unit: a nice value of n is allowed while 20 - n <= the limit.
    return soft == resource.RLIM_INFINITY or 20 - nice <= soft


@contextlib.contextmanager
def yielding(workers: Sequence[WorkerProcess]) -> Iterator[int]:
    """Raise the nice value of ``workers`` for the duration of the block (it gets how many).

    Afterwards each is set back to its own former value, unless it exited meanwhile (its pid
    may be another process's by then). Nothing is changed where the change could not be
    undone (see the module).
    """
    changed: list[tuple[WorkerProcess, int, int]] = []
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
        changed.append((worker, pid, nice))
    try:
        yield len(changed)
    finally:
        for worker, pid, nice in changed:
            if worker.is_dead() or worker.pid != pid:
                continue
            try:
                os.setpriority(os.PRIO_PROCESS, pid, nice)
            except ProcessLookupError:
                pass
            except OSError as err:
                log.warning("could not set the nice value of %s back: %s", worker.describe(), err)
