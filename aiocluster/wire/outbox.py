"""A channel's send queue: frames the socket would not take at once, with their descriptors.

Sent at once, a frame's descriptors need no copy: the kernel holds its own references from
the ``sendmsg`` on. Only a frame that must wait (behind others, or for room in the socket) is
queued, with duplicates, since the caller may close its own meanwhile. The queue is bounded in
bytes and in descriptors: a peer that stops reading closes the channel
(:class:`PeerNotReading`) rather than growing it without limit.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import socket
from collections.abc import Callable, Sequence

from aiocluster._errors import ChannelClosed
from aiocluster.wire.fds import close_fds, rights

__all__ = ["Outbox", "PeerNotReading"]


class PeerNotReading(ChannelClosed):
    """Why a channel closed itself: the peer stopped reading and too much was queued for it."""


class Outbox:
    """Sends on ``sock`` without blocking, queueing what does not fit, flushed when writable.

    ``fail(reason)`` closes the channel: a send that failed, or a peer that stopped reading.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        name: str,
        max_buffer: int,
        max_queued_fds: int,
        fail: Callable[[BaseException], None],
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._name = name
        self._max_buffer = max_buffer
        self._max_queued_fds = max_queued_fds
        self._fail = fail
        self._outq: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._outq_bytes = 0
        self._outq_fds = 0
        self._writing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush from ``loop`` from now on (before, what is queued waits)."""
        self._loop = loop

    def empty(self) -> bool:
        """True when nothing waits to be sent."""
        return not self._outq

    def close(self) -> None:
        """Stop flushing and close the duplicates of every descriptor still queued."""
        if self._writing and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_writer(self._fd)
        self._writing = False
        for _, fds in self._outq:
            close_fds(fds)
        self._outq.clear()
        self._outq_bytes = 0
        self._outq_fds = 0

    def put(self, data: bytes, fds: Sequence[int]) -> None:
        """Send ``data`` now, ``fds`` with its first byte; queue what the socket won't take.

        A send error closes the channel (and does not raise), except a bad descriptor of the
        caller's, which raises ``OSError`` as ``dup`` would have, with nothing sent. Raises
        :class:`ChannelClosed` if this frame overflowed a peer that stopped reading.
        """
        if not self._outq:
            try:
                sent = self._sock.sendmsg([data], rights(fds)) if fds else self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as err:
                if fds and err.errno == errno.EBADF:
                    raise  # one of the caller's descriptors: nothing went out, the channel is fine
                self._fail(ChannelClosed(f"channel {self._name}: send failed: {err}"))
                return
            if sent == len(data):
                return
            if sent:
                data, fds = data[sent:], ()  # the descriptors went with the first bytes
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))
        except BaseException:
            close_fds(dups)  # EMFILE halfway: the copies made so far must not leak
            raise
        self._outq.append((memoryview(data), dups))
        self._outq_bytes += len(data)
        self._outq_fds += len(dups)
        if self._outq_bytes > self._max_buffer or self._outq_fds > self._max_queued_fds:
            queued = f"{self._outq_bytes} bytes and {self._outq_fds} descriptors queued"
            self._fail(PeerNotReading(f"channel {self._name}: peer is not reading ({queued})"))
            raise ChannelClosed(f"channel {self._name} closed: peer is not reading")
        if not self._writing and self._loop is not None:
            self._loop.add_writer(self._fd, self._flush)
            self._writing = True

    def _flush(self) -> None:
        while self._outq:
            data, fds = self._outq[0]
            try:
                sent = self._sock.sendmsg([data], rights(fds)) if fds else self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                self._fail(ChannelClosed(f"channel {self._name}: send failed: {err}"))
                return
            # Once any byte went out the kernel holds its own references to the descriptors.
            close_fds(fds)
            self._outq_fds -= len(fds)
            self._outq_bytes -= sent
            if sent == len(data):
                self._outq.popleft()
            else:
                self._outq[0] = (data[sent:], [])
                break
        want_writer = bool(self._outq)
        if want_writer != self._writing and self._loop is not None:
            if want_writer:
                self._loop.add_writer(self._fd, self._flush)
            else:
                self._loop.remove_writer(self._fd)
            self._writing = want_writer
