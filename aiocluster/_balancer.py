"""The primary's connection handoff: accept loops for policy ``rr``, slot drains, counters.

Under ``rr`` only the primary accepts. Each connection goes to one worker in a ``newconn``
frame carrying its descriptor, and the primary keeps its own copy until the worker answers
``accepted: true``: a connection the worker refuses, or that was in flight when the worker
died, goes to another worker instead of being lost. A worker has at most ``max_unacked``
connections unanswered, so one whose event loop is stuck gets no more. Connections that no
worker can take yet wait in the primary, at most ``max_queued`` per listen; past that the
primary stops accepting and the kernel's backlog holds the rest.

The same handoff serves a scale-down under ``reuseport``: the primary accepts what the kernel
queued on a retired slot's socket and hands it to the remaining workers (:meth:`drain`).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import socket
from collections.abc import Iterable
from typing import Any

from . import _protocol as proto
from ._channel import Channel, close_fds
from ._codec import Frame
from ._errors import ChannelClosed
from ._handles import Handle
from ._policy import Balance, Scheduler

__all__ = ["Balancer", "Peer", "client_key"]

log = logging.getLogger("aiocluster.primary")

# Accepts per readiness callback: a burst goes in one wakeup (the primary's accept loop is the
# ceiling of policy rr), bounded so the channels and timers of the primary still get their turn.
_ACCEPT_BATCH = 128
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 1.0
# accept() failed because the process or the system ran out of something: wait, don't spin.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The client went away between its handshake and our accept(): skip it.
_CLIENT_ERRORS = frozenset({errno.ECONNABORTED, errno.ECONNRESET, errno.EPROTO, errno.EPERM})


def client_key(family: int, address: Any) -> str | None:
    """The client's host address for sticky hashing; None where there is none (Unix sockets)."""
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        return str(address[0])
    return None


class _Conn:
    """An accepted connection the primary holds until a worker has acknowledged it."""

    __slots__ = ("client", "group", "sock")

    def __init__(self, sock: socket.socket, client: str | None, group: _Group) -> None:
        self.sock = sock
        self.client = client
        self.group = group


class Peer:
    """The balancer's view of one worker (a :class:`~aiocluster._policy.Candidate`)."""

    __slots__ = (
        "acked",
        "adopted_reported",
        "channel",
        "groups",
        "id",
        "lost",
        "max_unacked",
        "name",
        "open_reported",
        "slot",
        "stuck",
        "unacked",
    )

    def __init__(
        self, worker_id: int, slot: int, name: str, channel: Channel, max_unacked: int
    ) -> None:
        self.id = worker_id
        self.slot = slot
        self.name = name
        self.channel = channel
        self.max_unacked = max_unacked
        #: The listens (handle ids) this worker serves.
        self.groups: set[int] = set()
        #: Handed and not yet answered, oldest first: the reply's future -> (connection, when).
        self.unacked: dict[asyncio.Future[Frame], tuple[_Conn, float]] = {}
        self.acked = 0
        self.open_reported = 0
        self.adopted_reported = 0
        self.stuck = False
        self.lost = False

    @property
    def load(self) -> int:
        """Open connections as last reported, plus those handed since (answered or not)."""
        since_report = max(0, self.acked - self.adopted_reported)
        return self.open_reported + since_report + len(self.unacked)

    @property
    def has_room(self) -> bool:
        """True while the worker may be handed another connection."""
        return len(self.unacked) < self.max_unacked and not self.channel.closed


class _Group:
    """One listen (a handle id): its scheduler, its waiting connections, its accept loop."""

    __slots__ = ("backoff", "closed", "handle", "id", "queue", "reading", "scheduler", "timer")

    def __init__(self, group_id: int, scheduler: Scheduler) -> None:
        self.id = group_id
        self.scheduler = scheduler
        self.queue: collections.deque[_Conn] = collections.deque()
        #: The socket the primary accepts on (policy rr); None when it only drains.
        self.handle: Handle | None = None
        self.reading = False
        self.closed = False
        self.backoff = 0.0
        self.timer: asyncio.TimerHandle | None = None


class Balancer:
    """Hands connections the primary accepted to workers, and counts what each one took.

    ``count_handoffs``: the per-worker counts in :attr:`accepted` come from acknowledged
    handoffs (policy rr); otherwise from what the workers report they accepted themselves.
    """

    def __init__(
        self,
        *,
        balance: Balance = "round-robin",
        sticky: bool = False,
        count_handoffs: bool = False,
        max_unacked: int = 8,
        max_queued: int = 64,
        stuck_after: float = 1.0,
    ) -> None:
        #: Connections accepted by each worker (by id), dead ones included.
        self.accepted: dict[int, int] = {}
        self._balance: Balance = balance
        self._sticky = sticky
        self._count_handoffs = count_handoffs
        self._max_unacked = max_unacked
        self._max_queued = max_queued
        self._stuck_after = stuck_after
        self._peers: dict[int, Peer] = {}
        self._groups: dict[int, _Group] = {}
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    # -- workers -----------------------------------------------------------------------------

    def join(self, worker_id: int, slot: int, name: str, channel: Channel, group_id: int) -> None:
        """A worker now serves the listen ``group_id``: it may be handed its connections."""
        peer = self._peers.get(worker_id)
        if peer is None or peer.channel is not channel:
            peer = Peer(worker_id, slot, name, channel, self._max_unacked)
            self._peers[worker_id] = peer
        peer.groups.add(group_id)
        self.accepted.setdefault(worker_id, 0)
        self._pump(self._group(group_id))

    def part(self, worker_id: int, group_id: int) -> None:
        """The worker stopped serving ``group_id``: hand it no more of its connections."""
        peer = self._peers.get(worker_id)
        if peer is not None:
            peer.groups.discard(group_id)

    def report(self, worker_id: int, *, accepted: int, open_: int, adopted: int) -> None:
        """What the worker says it accepted in all, has open, and adopted from the primary."""
        peer = self._peers.get(worker_id)
        if peer is not None:
            peer.open_reported = open_
            peer.adopted_reported = adopted
        if not self._count_handoffs:
            self.accepted[worker_id] = accepted

    # -- listens -----------------------------------------------------------------------------

    def serve(self, handle: Handle) -> None:
        """Accept on ``handle`` in the primary (policy rr) and hand out what it accepts."""
        group = self._group(handle.id)
        if group.handle is handle or self._closed:
            return
        group.handle = handle
        group.closed = False
        handle.on_close(functools.partial(self._close_group, group))
        self._resume(group)

    def drain(self, handles: Iterable[Handle]) -> int:
        """Accept what is queued on ``handles``, hand it to the workers, close the handles.

        For a scale-down under ``reuseport``: call it once the slot's worker has exited, so
        the primary's copy is the last one; the connections the kernel queued on the slot's
        socket are then served by the other workers rather than reset. Returns their number.
        """
        handed = 0
        for handle in handles:
            group = self._group(handle.id)
            while True:
                try:
                    sock, address = handle.sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as err:
                    if err.errno in _CLIENT_ERRORS:
                        continue
                    log.warning("draining %s: accept failed: %s", handle.describe(), err)
                    break
                handed += 1
                self._take(group, sock, address)
            log.info("closing %s: %d queued connection(s) handed over", handle.describe(), handed)
            handle.close()
        return handed

    def close(self) -> None:
        """Stop accepting, close every connection not yet taken, log the per-worker counts."""
        if self._closed:
            return
        self._closed = True
        for group in self._groups.values():
            self._close_group(group)
        for peer in self._peers.values():
            for conn, _ in peer.unacked.values():
                conn.sock.close()
            peer.unacked.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.accepted:
            counts = ", ".join(f"{wid}={n}" for wid, n in sorted(self.accepted.items()))
            log.info("connections per worker: %s", counts)

    # -- accepting ---------------------------------------------------------------------------

    def _group(self, group_id: int) -> _Group:
        group = self._groups.get(group_id)
        if group is None:
            scheduler = Scheduler(self._balance, sticky=self._sticky)
            group = self._groups[group_id] = _Group(group_id, scheduler)
        return group

    def _on_readable(self, group: _Group) -> None:
        handle = group.handle
        if handle is None or group.closed:
            return
        for _ in range(_ACCEPT_BATCH):
            if len(group.queue) >= self._max_queued:
                self._pause(group)  # the kernel's backlog holds the rest
                return
            try:
                sock, address = handle.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in _CLIENT_ERRORS:
                    continue
                self._back_off(group, err)
                return
            if group.backoff:
                group.backoff = 0.0
                log.info("accepting on %s again", handle.describe())
            self._take(group, sock, address)

    def _take(self, group: _Group, sock: socket.socket, address: Any) -> None:
        conn = _Conn(sock, client_key(sock.family, address), group)
        # FIFO unless sticky: then a connection for a worker with room must not wait behind
        # one for a worker without.
        if (group.queue and not self._sticky) or not self._hand(conn):
            group.queue.append(conn)

    def _resume(self, group: _Group) -> None:
        if group.closed or group.handle is None or group.reading or group.timer is not None:
            return
        if len(group.queue) >= self._max_queued:
            return
        asyncio.get_running_loop().add_reader(group.handle.sock.fileno(), self._on_readable, group)
        group.reading = True

    def _pause(self, group: _Group) -> None:
        if group.reading and group.handle is not None:
            asyncio.get_running_loop().remove_reader(group.handle.sock.fileno())
        group.reading = False

    def _back_off(self, group: _Group, err: OSError) -> None:
        """Out of descriptors (or memory): stop accepting for a while instead of spinning."""
        self._pause(group)
        if group.timer is not None:
            return
        first = not group.backoff
        group.backoff = min(_BACKOFF_MAX, group.backoff * 2 or _BACKOFF_FIRST)
        if first:
            where = group.handle.describe() if group.handle is not None else f"listen {group.id}"
            log.warning(
                "cannot take connections on %s: %s; pausing accepts for %gs (they wait in the "
                "kernel's backlog meanwhile; raise the open-files limit, ulimit -n)",
                where,
                err,
                group.backoff,
            )
        group.timer = asyncio.get_running_loop().call_later(
            group.backoff, self._after_backoff, group
        )

    def _after_backoff(self, group: _Group) -> None:
        group.timer = None
        self._pump(group)
        self._resume(group)

    def _close_group(self, group: _Group) -> None:
        self._pause(group)
        group.closed = True
        group.handle = None
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        if group.queue:
            log.info("closing %d connection(s) no worker took before the stop", len(group.queue))
        while group.queue:
            group.queue.popleft().sock.close()

    # -- handing over ------------------------------------------------------------------------

    def _hand(self, conn: _Conn) -> bool:
        """Send ``conn`` to the worker the scheduler picks; False if none can take it now."""
        group = conn.group
        while True:
            candidates = []
            for peer in list(self._peers.values()):
                if peer.channel.closed:
                    if not peer.unacked:
                        del self._peers[peer.id]  # a dead worker with nothing left to settle
                elif group.id in peer.groups:
                    candidates.append(peer)
            if self._sticky:
                # A worker whose loop is stuck is not live for its clients: they move to
                # their next slot until it answers again, rather than wait and fill the queue.
                candidates = [p for p in candidates if not p.stuck] or candidates
            chosen = group.scheduler.choose(candidates, conn.client)
            if chosen is None:
                return False
            try:
                fut = chosen.channel.call(
                    {"act": proto.NEWCONN, "handle": group.id}, [conn.sock.fileno()]
                )
            except ChannelClosed:
                continue  # it just died: it is no candidate any more
            except OSError as err:  # no descriptor left to duplicate it with
                self._back_off(group, err)
                return False
            chosen.unacked[fut] = (conn, asyncio.get_running_loop().time())
            fut.add_done_callback(functools.partial(self._answered, chosen))
            self._arm_watchdog()
            return True

    def _answered(self, peer: Peer, fut: asyncio.Future[Frame]) -> None:
        entry = peer.unacked.pop(fut, None)
        if entry is None:
            return  # the balancer closed: the connection is closed already
        conn, _ = entry
        group = conn.group
        reply = None if fut.cancelled() or fut.exception() is not None else fut.result()
        if reply is not None:
            close_fds(reply.fds)  # a reply never carries any; be sure
        if reply is not None and reply.msg.get("accepted") is True:
            conn.sock.close()  # the worker holds its own copy now
            peer.acked += 1
            if self._count_handoffs:
                self.accepted[peer.id] = self.accepted.get(peer.id, 0) + 1
        elif reply is not None:
            if group.id in peer.groups:
                peer.groups.discard(group.id)
                log.info(
                    "%s refused a connection (it is stopping); handing it to another worker",
                    peer.name,
                )
            self._retry(conn)
        else:
            if not peer.lost:
                peer.lost = True
                log.warning(
                    "%s is gone with %d connection(s) it had not acknowledged; handing them "
                    "to other workers",
                    peer.name,
                    len(peer.unacked) + 1,
                )
            self._retry(conn)
        if peer.stuck and not peer.unacked:
            peer.stuck = False
            if not peer.channel.closed:
                log.info("%s answers again", peer.name)
        for group_id in {group.id, *peer.groups}:
            self._pump(self._group(group_id))

    def _retry(self, conn: _Conn) -> None:
        """Give a connection back to its listen, ahead of the ones accepted after it."""
        if self._closed:
            conn.sock.close()
        elif not self._hand(conn):
            if conn.group.closed:
                conn.sock.close()  # stopping, and every worker refused it
            else:
                conn.group.queue.appendleft(conn)

    def _pump(self, group: _Group) -> None:
        """Hand out the connections waiting in ``group`` that a worker can take now."""
        if group.queue and group.timer is None:
            if self._sticky:
                waiting: collections.deque[_Conn] = collections.deque()
                while group.queue:
                    conn = group.queue.popleft()
                    if not self._hand(conn):
                        waiting.append(conn)
                group.queue = waiting
            else:
                while group.queue and self._hand(group.queue[0]):
                    group.queue.popleft()
        self._resume(group)

    # -- stuck workers -----------------------------------------------------------------------

    def _arm_watchdog(self) -> None:
        if self._watchdog is None and not self._closed:
            self._watchdog = asyncio.get_running_loop().call_later(
                self._stuck_after, self._check_stuck
            )

    def _check_stuck(self) -> None:
        self._watchdog = None
        now = asyncio.get_running_loop().time()
        waiting = newly_stuck = False
        for peer in self._peers.values():
            if not peer.unacked or peer.channel.closed:
                continue
            waiting = True
            _, since = next(iter(peer.unacked.values()))
            if not peer.stuck and now - since >= self._stuck_after:
                peer.stuck = newly_stuck = True
                log.warning(
                    "%s has not answered for %.1fs about %d connection(s) handed to it: its "
                    "event loop looks blocked; it gets no new connections until it answers",
                    peer.name,
                    now - since,
                    len(peer.unacked),
                )
        if waiting:
            self._arm_watchdog()
        if newly_stuck and self._sticky:
            for group in self._groups.values():
                self._pump(group)
