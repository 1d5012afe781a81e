"""Which role this process plays — primary, zygote or worker — decided in one place.

A process is a **worker** when the primary started it with ``AIOCLUSTER_WORKER_ID`` and
``AIOCLUSTER_CHANNEL_FD`` in its environment (Node's ``NODE_UNIQUE_ID``), the **zygote** when it
has ``AIOCLUSTER_ZYGOTE_FD``, and the **primary** otherwise. The environment is read once, when
this module is first imported; the descriptor variables are then removed, so that programs
this process starts do not mistake themselves for it. A process forked by the primary (the
zygote) or by the zygote (a worker) is told its role by :func:`become_zygote` or
:func:`become_worker` instead.

Nothing here imports the rest of aiocluster: the command line asks for the role before it
loads anything else.
"""

from __future__ import annotations

import contextlib
import enum
import os
from dataclasses import dataclass

__all__ = [
    "ENV_CHANNEL_FD",
    "ENV_UPGRADE_FD",
    "ENV_WORKER_ID",
    "ENV_WORKER_SLOT",
    "ENV_ZYGOTE_FD",
    "Identity",
    "Role",
    "become_worker",
    "become_zygote",
    "identity",
    "resuming",
    "role",
    "take_upgrade_fd",
]

#: How a process learns it is a worker, and which one (Node: ``NODE_UNIQUE_ID``).
ENV_WORKER_ID = "AIOCLUSTER_WORKER_ID"
#: The worker's slot: 1..N, kept by the worker that replaces it.
ENV_WORKER_SLOT = "AIOCLUSTER_WORKER_SLOT"
#: The descriptor of a spawned worker's end of its channel to the primary.
ENV_CHANNEL_FD = "AIOCLUSTER_CHANNEL_FD"
#: The descriptor of a spawned zygote's channel to the primary.
ENV_ZYGOTE_FD = "AIOCLUSTER_ZYGOTE_FD"
#: The descriptor of the state an upgrading primary handed to its own new image (``execve``).
ENV_UPGRADE_FD = "AIOCLUSTER_UPGRADE_FD"


class Role(enum.Enum):
    """The three roles: which code a process runs."""

    #: Owns the sockets and supervises; never serves the application.
    PRIMARY = "primary"
    #: Loads the application once and forks workers (start method ``fork``); no event loop.
    ZYGOTE = "zygote"
    #: Serves the application on the sockets the primary grants.
    WORKER = "worker"


@dataclass(frozen=True, slots=True)
class Identity:
    """This process's role, and for a worker its id, slot and channel."""

    role: Role
    #: The worker's id (1, 2, ... unique for the cluster's life); None in other roles.
    worker_id: int | None = None
    #: The worker's slot (1..N); None in other roles.
    slot: int | None = None
    #: The channel to the primary: a worker's or the zygote's; None in the primary.
    channel_fd: int | None = None


def _from_environment() -> Identity:
    zygote_fd = _pop_int(ENV_ZYGOTE_FD)
    if zygote_fd is not None:
        return Identity(Role.ZYGOTE, channel_fd=zygote_fd)
    try:
        wid = int(os.environ[ENV_WORKER_ID])
    except (KeyError, ValueError):
        return _primary()
    fd = _pop_int(ENV_CHANNEL_FD)
    if fd is None:
        # An id but no channel: started by hand with the variable set (or a worker's own
        # child that kept its environment). Not a worker: nothing could reach the primary.
        return _primary()
    try:
        slot: int | None = int(os.environ.get(ENV_WORKER_SLOT, ""))
    except ValueError:
        slot = None
    _close_inherited(keep=fd)
    return Identity(Role.WORKER, wid, slot, fd)


# The state an upgrading primary left for this process (its new image), until taken.
_upgrade_fd: int | None = None


def _primary() -> Identity:
    global _upgrade_fd
    _upgrade_fd = _pop_int(ENV_UPGRADE_FD)
    return Identity(Role.PRIMARY)


def resuming() -> bool:
    """True in a primary that is the new image of an in-place upgrade, until it resumed."""
    return _upgrade_fd is not None


def take_upgrade_fd() -> int | None:
    """The descriptor of the upgrade's state (see :mod:`aiocluster.primary.upgrade`), once."""
    global _upgrade_fd
    fd, _upgrade_fd = _upgrade_fd, None
    return fd


def _pop_int(name: str) -> int | None:
    try:
        return int(os.environ.pop(name))
    except (KeyError, ValueError):
        return None


def _close_inherited(keep: int) -> None:
    """Close every descriptor this worker inherited except stdio and its channel.

    Python creates only non-inheritable descriptors (PEP 446), so an inheritable one here came
    through exec. The primary passes only the channel, but uvloop's subprocess_exec does not
    implement close_fds: under it a worker would inherit every inheritable descriptor of the
    primary (and libuv's copies of stdio), holding them open for its whole life.
    """
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            fd = int(name)
            if fd > 2 and fd != keep:
                with contextlib.suppress(OSError):  # the listing's own descriptor is gone
                    if os.get_inheritable(fd):
                        os.close(fd)
        return


_identity = _from_environment()


def identity() -> Identity:
    """This process's :class:`Identity`."""
    return _identity


def role() -> Role:
    """This process's :class:`Role`."""
    return _identity.role


def become_zygote(channel_fd: int) -> None:
    """In a process just forked from the primary: be its zygote, on ``channel_fd``."""
    global _identity
    _identity = Identity(Role.ZYGOTE, channel_fd=channel_fd)


def become_worker(worker_id: int, slot: int, channel_fd: int) -> None:
    """In a process the zygote just forked: take on the identity a spawned worker reads.

    The variables are set for the program's own use (``AIOCLUSTER_WORKER_ID``, as Node's
    ``NODE_UNIQUE_ID``); the channel descriptor, as under spawn, is not in the environment.
    """
    global _identity
    os.environ[ENV_WORKER_ID] = str(worker_id)
    os.environ[ENV_WORKER_SLOT] = str(slot)
    _identity = Identity(Role.WORKER, worker_id, slot, channel_fd)
