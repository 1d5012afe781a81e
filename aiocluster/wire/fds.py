"""Descriptors passed with SCM_RIGHTS: the ancillary data that carries them, and closing them.

Apart from the channel, which needs asyncio: the zygote reads its fork requests with plain
blocking calls, in a process the CLI forks before anything heavy is imported.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Sequence

__all__ = ["ancillary_space", "close_fds", "received_fds", "rights"]

_FD_SIZE = array.array("i").itemsize


def ancillary_space(count: int) -> int:
    """The ``recvmsg`` ancillary buffer size for up to ``count`` descriptors (at least one)."""
    return socket.CMSG_SPACE(max(1, count) * _FD_SIZE)


def rights(fds: Sequence[int]) -> list[tuple[int, int, array.array[int]]]:
    """The ``sendmsg`` ancillary data that passes ``fds``."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """Every descriptor that ``recvmsg`` ancillary data carried (ours to close from then on)."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            # A truncated payload may end in part of a descriptor: only whole ones are real.
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return fds


def close_fds(fds: Sequence[int]) -> None:
    """Close each descriptor, ignoring ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
