"""Upgrading the primary in place: a pre-flight, a quiesce, and ``execve`` of the same pid.

The primary holds every listening socket and every worker's channel as plain descriptors, and
the workers are its children: it can replace its own code without a new process. In order:

1. **Pre-flight** (:func:`preflight`): ``sys.executable -m aiocluster.ops.upgrade_check`` with the
   primary's environment, in its directory, reads the state document on stdin. It imports the
   new code as installed now, compiles every module of the package, and loads the document with
   the new code's reader. A nonzero exit, or no answer within :data:`PREFLIGHT_TIMEOUT`: the
   upgrade is refused with its one line and nothing has changed.
2. **Quiesce** (:func:`quiesce`): under ``rr`` the primary stops accepting (the kernel's backlog
   holds new connections) and waits, bounded, until every hand-off is answered (under
   ``reuseport`` it takes the slots' sockets out of its rotation's map, which the new image's
   replaces: the kernel's hash spreads connections meanwhile); then it stops
   reading every channel at a frame boundary, with nothing queued to send and no request open.
   A channel that does not settle in time: the primary reads again and the upgrade is refused.
3. **Hand over** (:func:`execute`): the state goes to a memfd; exactly the descriptors the
   document names (and the memfd) are made inheritable, ``$AIOCLUSTER_UPGRADE_FD`` names the
   memfd, and the primary ``execve``\\ s its interpreter with its original arguments. Every other
   descriptor is close-on-exec (PEP 446), so none leaks into the new image.

The new image (:func:`read_state`) finds the variable at import (``_role``), forks no zygote,
and rebuilds the cluster around the inherited descriptors (``Cluster.restore``). Linux only:
the new image watches workers it did not spawn through pidfds (``os.pidfd_open``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

from aiocluster._errors import AioclusterError
from aiocluster._role import ENV_UPGRADE_FD, take_upgrade_fd
from aiocluster.primary.cluster import Cluster
from aiocluster.primary.upgrade_state import MAX_SIZE, UpgradeState, dump, load

__all__ = [
    "PREFLIGHT_TIMEOUT",
    "QUIESCE_TIMEOUT",
    "UpgradeRefused",
    "execute",
    "preflight",
    "quiesce",
    "read_state",
    "refusal",
]

log = logging.getLogger("aiocluster.primary")

#: Seconds the new code gets to prove it imports and reads the state.
PREFLIGHT_TIMEOUT = 30.0
#: Seconds the hand-offs and channels get to settle before the exec.
QUIESCE_TIMEOUT = 2.0
# The operator's signals whose default action is to end the process (see execute()).
_IGNORED_ACROSS_EXEC = (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)
# How often settling is checked while quiescing: it is the sum of many channels' and hand-offs'
# states, each settled by its own callback; there is no one event to wait on.
_SETTLE_CHECK = 0.005


class UpgradeRefused(AioclusterError):
    """The upgrade did not happen; the primary carries on with its old code."""


def refusal(cluster: Cluster) -> str | None:
    """Why ``cluster`` cannot be handed over now (None: it can)."""
    if not hasattr(os, "pidfd_open") or not sys.platform.startswith("linux"):
        return "upgrading the primary in place needs Linux (pidfds); restart it instead"
    if cluster.stopping:
        return "the cluster is stopping"
    if not cluster.is_ready():
        return "the cluster is not ready (workers are starting); try again once it serves"
    if cluster.rollout.busy:
        return "a reload is running; try again once it is done"
    if cluster.starter.busy():
        return "a zygote is starting; try again in a moment"
    for worker in cluster.workers.values():
        if worker.state != "listening" or worker.retiring or worker.replaces:
            return (
                f"{worker.describe()} is {(worker.retiring and 'retiring') or worker.state}; "
                "try again once every worker serves"
            )
    return None


async def preflight(state: UpgradeState, timeout: float = PREFLIGHT_TIMEOUT) -> str:
    """Run the new code in a child far enough to prove it can take over; its version.

    Raises :class:`UpgradeRefused` with the child's last line if it fails.
    """
    document = dump(state)
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiocluster.ops.upgrade_check",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as err:
        raise UpgradeRefused(f"the pre-flight check cannot start: {err}") from None
    try:
        async with asyncio.timeout(timeout):
            out, errors = await child.communicate(document)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
        raise UpgradeRefused(
            f"the new code did not pass its pre-flight within {timeout:g}s"
        ) from None
    if child.returncode != 0:
        lines = [line for line in errors.decode(errors="replace").splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {child.returncode}"
        why = why.removeprefix("aiocluster: error: ")
        raise UpgradeRefused(f"the new code failed its pre-flight: {why}")
    return out.decode(errors="replace").strip() or "?"


async def quiesce(cluster: Cluster, timeout: float = QUIESCE_TIMEOUT) -> Callable[[], None]:
    """Stop reading new work, at a point where nothing lives only in this process.

    Returns the function that undoes it (for an exec that failed). Raises
    :class:`UpgradeRefused` (having undone it) if the channels do not settle in ``timeout``.
    """
    listens = cluster.listens
    listens.hold()
    channels = [w.channel for w in cluster.workers.values() if w.channel is not None]
    zygote = cluster.starter.zygote
    # Each channel's (pause, resume), the zygote's too: all stop and start reading together.
    ends = [(c.pause, c.resume) for c in channels]
    if zygote is not None:
        ends.append((zygote.pause, zygote.resume))
    paused = False

    def reading(on: bool) -> None:
        nonlocal paused
        for pause, resume in ends:
            (resume if on else pause)()
        paused = not on

    def undo() -> None:
        if paused:
            reading(True)
        listens.release()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if listens.settled():
            reading(False)
            idle = all(channel.idle() for channel in channels)
            if idle and (zygote is None or zygote.handover() is not None):
                return undo
            reading(True)  # mid-frame, or a reply still queued: read and write on a moment
        if loop.time() >= deadline:
            undo()
            raise UpgradeRefused(
                f"the workers' channels did not settle within {timeout:g}s (a worker is not "
                "reading, or hand-offs are unanswered); the old code keeps running"
            )
        await asyncio.sleep(_SETTLE_CHECK)


def execute(state: UpgradeState) -> None:
    """Hand ``state`` over and ``execve`` the new image; returns only if the exec failed
    (raising :class:`UpgradeRefused`, with every descriptor as it was)."""
    fds = state.fds()
    memfd = os.memfd_create("aiocluster-upgrade", 0)
    # Ignored dispositions survive execve, handlers do not: a SIGHUP or a second SIGUSR2 that
    # lands while the new image starts is dropped, rather than killing the primary by its
    # default action. SIGTERM and SIGINT keep theirs: a stop asked for then still stops.
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _IGNORED_ACROSS_EXEC}
    try:
        os.write(memfd, dump(state))
        os.lseek(memfd, 0, os.SEEK_SET)
        for fd in [*fds, memfd]:
            os.set_inheritable(fd, True)
        os.environ[ENV_UPGRADE_FD] = str(memfd)
        argv = list(state.argv)
        log.info("upgrading in place: exec %s", " ".join(argv))
        for handler in logging.getLogger().handlers + logging.getLogger("aiocluster").handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(argv[0], argv)
    except OSError as err:
        for sig, previous in saved.items():
            if previous is not None:
                signal.signal(sig, previous)
        os.environ.pop(ENV_UPGRADE_FD, None)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        raise UpgradeRefused(f"the hand-over to {state.argv[0]} failed: {err}") from None
    finally:
        # Only reached when the exec failed: the memfd is ours to close then.
        os.close(memfd)


def read_state() -> UpgradeState | None:
    """In the new image: the state the old one left (None: not an upgrade's image).

    Raises :class:`~aiocluster.primary.upgrade_state.BadState` if it cannot be read; the
    memfd is closed either way.
    """
    fd = take_upgrade_fd()
    if fd is None:
        return None
    try:
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_SIZE:
                break
    finally:
        os.close(fd)
    return load(b"".join(chunks))
