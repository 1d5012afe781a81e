"""A worker's connection counts and the connections the primary hands over.

Counting: every connection this worker accepts, itself or from the primary, is counted, and
the counts go to the primary in ``load`` frames, at most one per report interval (often under
``rr`` with ``least-conn``, which chooses by them). Hand-over: each ``newconn`` frame from the
primary is answered once, the connections it carries adopted by the server registered for
their listen (see :mod:`aiocluster.worker.adopt`) or refused, so the primary hands them to
another worker.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from aiocluster._errors import ProtocolError
from aiocluster._logging import Throttled
from aiocluster.wire import messages as proto
from aiocluster.wire.channel import Channel
from aiocluster.wire.codec import Frame, Prepared
from aiocluster.wire.fds import close_fds

__all__ = ["Adopter", "Handoffs"]

log = logging.getLogger("aiocluster.worker")

P = TypeVar("P", bound=asyncio.BaseProtocol)


class Adopter(Protocol):
    """A server that can take over a connection accepted elsewhere (by the primary)."""

    def adopt(self, sock: socket.socket) -> bool:
        """Start serving ``sock`` and return True, or return False to refuse it (never raise)."""


class Handoffs:
    """What this worker accepted, reported on ``channel``, and the connections handed over.

    ``stopping``: once set, connections handed over are refused.
    """

    def __init__(self, channel: Channel, stopping: asyncio.Event) -> None:
        self._channel = channel
        self._stopping = stopping
        #: Connections this worker accepted, itself or from the primary.
        self.accepted = 0
        #: Of those, the ones the primary accepted and handed over.
        self.adopted = 0
        self._adopters: dict[int, Adopter] = {}
        # Adopted connections still open, for least-conn only (pruned when reported).
        self._track_open = False
        self._open: set[asyncio.BaseTransport] = set()
        self._adopting = 0  # handed over, its transport not made yet: open all the same
        self._report_interval = 1.0
        self._report_timer: asyncio.TimerHandle | None = None
        self._reported = (0, 0, 0)
        self._refusals = Throttled(log, "refused connections handed over by the primary")

    def configure(self, policy: str, balance: str) -> None:
        """Report as the primary's scheduling needs: often if it chooses by open counts."""
        # The primary needs open counts only to choose by them: then report often.
        self._track_open = policy == "rr" and balance == "least-conn"
        self._report_interval = 0.1 if self._track_open else 1.0

    def route(self, handle: int, adopter: Adopter) -> None:
        """Connections the primary hands over for listen ``handle`` go to ``adopter``."""
        self._adopters[handle] = adopter

    def unroute(self, handle: int, adopter: Adopter) -> None:
        """Refuse the connections of ``handle`` from now on (if ``adopter`` still serves it)."""
        if self._adopters.get(handle) is adopter:
            del self._adopters[handle]

    def counted(self, factory: Callable[[], P]) -> Callable[[], P]:
        """``factory``, counting each connection it is called for (servers that accept)."""

        def counting() -> P:
            self.accepted += 1
            self._changed()
            return factory()

        return counting

    def note_adopted(self) -> None:
        """Count a connection handed over by the primary (then call :meth:`adoption_done`)."""
        self.accepted += 1
        self.adopted += 1
        self._adopting += 1
        self._changed()

    def adoption_done(self, transport: asyncio.BaseTransport | None) -> None:
        """The adopted connection is served by ``transport`` (None: it failed at once)."""
        self._adopting -= 1
        if self._track_open and transport is not None:
            self._open.add(transport)
        self._changed()

    def close(self) -> None:
        """Report no more, but send the last counters if they changed."""
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None
        if not self._channel.closed:
            self._send_load()

    def _changed(self) -> None:
        if self._report_timer is None and not self._channel.closed:
            loop = asyncio.get_running_loop()
            self._report_timer = loop.call_later(self._report_interval, self._report)

    def _report(self) -> None:
        self._report_timer = None
        self._send_load()
        if self._open or self._adopting:
            # No event tells us an adopted connection ended: look again at the next report.
            self._changed()

    def _send_load(self) -> None:
        self._open = {t for t in self._open if not t.is_closing()}
        state = (self.accepted, len(self._open) + self._adopting, self.adopted)
        if state != self._reported and not self._channel.closed:
            accepted, open_, adopted = state
            msg = {"act": proto.LOAD, "accepted": accepted, "open": open_, "adopted": adopted}
            self._channel.send(msg)
            self._reported = state

    def on_newconn(self, frame: Frame) -> None:
        """Adopt or refuse the connections of one ``newconn`` frame; answer it once."""
        if frame.truncated:
            # At the open-files limit: the primary keeps its copies, hands them to another
            # worker and gives this one a rest.
            self._refusals.note("out of descriptors (the primary hands them to another worker)")
            self._channel.reply(frame, _BUSY)
            return
        if not frame.fds:
            raise ProtocolError("newconn with no descriptor")
        until = frame.msg.get("until")
        if isinstance(until, float | int) and time.monotonic() > until:
            # Read after its deadline (this loop was blocked, or the process stopped): the
            # primary has given these connections to another worker meanwhile.
            close_fds(frame.fds)
            self._refusals.note("read after their deadline: this event loop was blocked")
            self._channel.reply(frame, _LATE)
            return
        handle = frame.msg.get("handle")
        adopter = self._adopters.get(handle) if isinstance(handle, int) else None
        if adopter is None or self._stopping.is_set():
            close_fds(frame.fds)
            self._channel.reply(frame, _REFUSED)
            return
        taken = [_adopt(adopter, fd) for fd in frame.fds]
        # One answer for the whole frame: the primary closes its copies of what we took and
        # hands the rest to another worker.
        if all(taken):
            self._channel.reply(frame, _ACCEPTED)
        elif not any(taken):
            self._channel.reply(frame, _REFUSED)
        else:
            self._channel.reply(frame, {"accepted": taken})


# The answers to a newconn frame, encoded once (see Prepared): one per frame, not per connection.
_ACCEPTED = Prepared({"act": proto.NEWCONN, "accepted": True})
_REFUSED = Prepared({"act": proto.NEWCONN, "accepted": False})
_BUSY = Prepared({"act": proto.NEWCONN, "accepted": False, "why": proto.BUSY})
_LATE = Prepared({"act": proto.NEWCONN, "accepted": False, "why": proto.LATE})


def _adopt(adopter: Adopter, fd: int) -> bool:
    """Give the connection ``fd`` to ``adopter``; False (and ``fd`` closed) if it is not taken."""
    try:
        # Type and protocol given: a stream socket from accept(); only the family is asked
        # of the kernel (getsockname, which also checks it is a socket at all).
        sock = socket.socket(type=socket.SOCK_STREAM, proto=0, fileno=fd)
    except OSError as err:
        log.warning("a connection handed over by the primary is unusable: %s", err)
        close_fds([fd])
        return False
    if adopter.adopt(sock):
        return True
    sock.close()
    return False
