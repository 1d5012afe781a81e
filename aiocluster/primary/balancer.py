"""The primary's connection handoff: accept loops for policy ``rr``, slot drains, counters.

Under ``rr`` only the primary accepts. Each connection goes to one worker, chosen for it alone
by the scheduler; what one wake-up accepted goes out as one ``newconn`` frame per worker,
carrying the descriptors of that worker's share, answered once. The primary keeps its own copy
of each connection until the worker says it took it: a connection the worker refuses, or that
was in flight when the worker died, goes to another worker instead of being lost. A worker
has at most ``max_unacked`` connections unanswered, so one whose event loop is stuck gets no
more. Connections that no worker can take yet wait in the primary, at most ``max_queued`` per
listen; past that the primary stops accepting and the kernel's backlog holds the rest.

The same handoff serves a scale-down under ``reuseport``: the primary accepts what the kernel
queued on a retired slot's socket and hands it to the remaining workers (:meth:`drain`).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from aiocluster._config import Balance
from aiocluster._errors import ChannelClosed, ProtocolError
from aiocluster.primary.handles import Handle
from aiocluster.primary.scheduling import Scheduler
from aiocluster.wire import messages as proto
from aiocluster.wire.channel import Channel
from aiocluster.wire.codec import MAX_FDS, Frame, Prepared
from aiocluster.wire.fds import close_fds

__all__ = ["Balancer", "Peer", "client_key", "summarize_counts"]

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


def _accepter(sock: socket.socket) -> Callable[[], tuple[int, Any]]:
    """``sock.accept()``, returning the bare descriptor rather than a socket object.

    The primary only holds a connection and passes it on: a socket object for each one (its
    ``__init__``, the enum conversions of its family and type, its ``close``) was a good share
    of what the primary spent per connection. ``_accept`` is the primitive under
    ``socket.accept()`` (CPython, PyPy): the descriptor is close-on-exec like any other.
    """
    raw = getattr(sock, "_accept", None)
    if callable(raw):
        return cast(Callable[[], tuple[int, Any]], raw)

    def accept() -> tuple[int, Any]:
        conn, address = sock.accept()
        return conn.detach(), address

    return accept


def client_key(family: int, address: Any) -> str | None:
    """The client's host address for sticky hashing; None where there is none (Unix sockets)."""
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        return str(address[0])
    return None


class _Conn:
    """An accepted connection the primary holds until a worker has acknowledged it.

    A bare descriptor, not a socket object: the primary never reads or writes it.
    """

    __slots__ = ("client", "fd")

    def __init__(self, fd: int, client: str | None) -> None:
        self.fd = fd
        self.client = client

    def close(self) -> None:
        # Not contextlib.suppress: this runs for every connection, and it costs twice as much.
        try:  # noqa: SIM105
            os.close(self.fd)
        except OSError:
            pass


class _Batch:
    """Connections of one listen handed to one worker in one ``newconn`` frame.

    ``until`` (``time.monotonic()``, the same clock in every process): the worker refuses the
    frame if it reads it later than that, so past it the primary may hand them elsewhere.
    """

    __slots__ = ("conns", "group", "sent", "seq", "until")

    def __init__(self, group: _Group, conns: list[_Conn], sent: float, until: float) -> None:
        self.group = group
        self.conns = conns
        self.sent = sent
        self.until = until
        self.seq = 0


class Peer:
    """The balancer's view of one worker (a :class:`~aiocluster.primary.scheduling.Candidate`)."""

    __slots__ = (
        "acked",
        "adopted_reported",
        "batches",
        "channel",
        "groups",
        "id",
        "lost",
        "max_unacked",
        "name",
        "open_reported",
        "rest",
        "rest_until",
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
        #: Handed and not yet answered, by the request's seq, oldest first.
        self.batches: dict[int, _Batch] = {}
        #: Connections in those batches, and those being put in one (so choosing sees them).
        self.unacked = 0
        self.acked = 0
        self.open_reported = 0
        self.adopted_reported = 0
        self.stuck = False
        self.lost = False
        #: Out of descriptors: its current back-off, and no connections before this time.
        self.rest = 0.0
        self.rest_until = 0.0

    @property
    def load(self) -> int:
        """Open connections as last reported, plus those handed since (answered or not)."""
        since_report = max(0, self.acked - self.adopted_reported)
        return self.open_reported + since_report + self.unacked

    @property
    def has_room(self) -> bool:
        """True while the worker may be handed another connection."""
        return self.unacked < self.max_unacked and not self.channel.closed


class _Group:
    """One listen (a handle id): its scheduler, its waiting connections, its accept loop."""

    __slots__ = (
        "backoff",
        "closed",
        "handle",
        "id",
        "newconn",
        "queue",
        "reading",
        "scheduler",
        "timer",
    )

    def __init__(self, group_id: int, scheduler: Scheduler) -> None:
        self.id = group_id
        self.scheduler = scheduler
        #: Accepted, not handed yet (or handed back), oldest first.
        self.queue: collections.deque[_Conn] = collections.deque()
        #: The socket the primary accepts on (policy rr); None when it only drains.
        self.handle: Handle | None = None
        self.reading = False
        self.closed = False
        self.backoff = 0.0
        self.timer: asyncio.TimerHandle | None = None
        #: The newconn request for this listen, encoded once: only its seq changes.
        self.newconn = Prepared({"act": proto.NEWCONN, "handle": group_id})


class Balancer:
    """Hands connections the primary accepted to workers, and counts what each one took.

    ``count_handoffs``: the per-worker counts in :attr:`accepted` come from acknowledged
    handoffs (policy rr); otherwise from what the workers report they accepted themselves.
    ``on_count(worker_id, total)`` hears every change of a worker's count.
    """

    def __init__(
        self,
        *,
        balance: Balance = "round-robin",
        sticky: bool = False,
        count_handoffs: bool = False,
        # One full newconn frame in flight per worker: bursts go out in frames of up to 16,
        # which costs the primary ~10-20 % less per connection than 8 (cpu_cost.py).
        max_unacked: int = MAX_FDS,
        max_queued: int = 64,
        stuck_after: float = 1.0,
        reroute_after: float = 2.0,
        on_count: Callable[[int, int], None] | None = None,
    ) -> None:
        #: Connections accepted by each worker (by id), dead ones included.
        self.accepted: dict[int, int] = {}
        self._balance: Balance = balance
        self._sticky = sticky
        self._count_handoffs = count_handoffs
        self._on_count = on_count
        self._max_unacked = max_unacked
        self._max_queued = max_queued
        self._stuck_after = stuck_after
        self._reroute_after = reroute_after
        self._rest_timer: asyncio.TimerHandle | None = None
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
            self._count(worker_id, accepted)

    def _count(self, worker_id: int, total: int) -> None:
        self.accepted[worker_id] = total
        if self._on_count is not None:
            self._on_count(worker_id, total)

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
            count, failed = self._accept(group, handle, None)
            if failed is not None:
                log.warning("draining %s: accept failed: %s", handle.describe(), failed)
            handed += count
            self._pump(group)
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
            for batch in peer.batches.values():
                for conn in batch.conns:
                    conn.close()
            peer.batches.clear()
            peer.unacked = 0
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._rest_timer is not None:
            self._rest_timer.cancel()
            self._rest_timer = None
        if self.accepted:
            log.info("connections per worker: %s", summarize_counts(self.accepted))

    # -- accepting ---------------------------------------------------------------------------

    def _group(self, group_id: int) -> _Group:
        group = self._groups.get(group_id)
        if group is None:
            scheduler = Scheduler(self._balance, sticky=self._sticky)
            group = self._groups[group_id] = _Group(group_id, scheduler)
        return group

    def _conn(self, fd: int, address: Any, family: int) -> _Conn:
        # The client's address matters only to sticky: don't compute it for nothing.
        return _Conn(fd, client_key(family, address) if self._sticky else None)

    def _on_readable(self, group: _Group) -> None:
        """Accept what is there (up to a batch), then hand it all out: one frame per worker."""
        handle = group.handle
        if handle is None or group.closed:
            return
        room = self._max_queued - len(group.queue)
        _count, failed = self._accept(group, handle, min(_ACCEPT_BATCH, room))
        if group.backoff and failed is None:
            group.backoff = 0.0
            log.info("accepting on %s again", handle.describe())
        self._hand_out(group)
        if failed is not None:
            self._back_off(group, failed)
        elif len(group.queue) >= self._max_queued:
            self._pause(group)  # the kernel's backlog holds the rest until workers take some

    def _accept(
        self, group: _Group, handle: Handle, limit: int | None
    ) -> tuple[int, OSError | None]:
        """Accept onto ``group``'s queue until none is waiting or ``limit`` (None: no limit).

        Returns how many, and the error that stopped it (out of descriptors, say), if any. A
        connection that failed on the client's side is skipped.
        """
        accept, family = _accepter(handle.sock), handle.sock.family
        queue = group.queue
        count = 0
        while limit is None or count < limit:
            try:
                fd, address = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                if err.errno in _CLIENT_ERRORS:
                    continue
                return count, err
            queue.append(self._conn(fd, address, family))
            count += 1
        return count, None

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
            group.queue.popleft().close()

    # -- handing over ------------------------------------------------------------------------

    def _candidates(self, group: _Group) -> list[Peer]:
        candidates = []
        for peer in list(self._peers.values()):
            if peer.channel.closed:
                if not peer.batches:
                    del self._peers[peer.id]  # a dead worker with nothing left to settle
            elif group.id in peer.groups:
                candidates.append(peer)
        # A worker whose loop is stuck gets nothing new until it answers (under sticky its
        # clients move to their next slot); one out of descriptors nothing until its back-off
        # ends. If every worker is stuck, the stuck ones still beat a queue nobody serves.
        now = time.monotonic()
        awake = [p for p in candidates if p.rest_until <= now]
        if len(awake) < len(candidates):
            self._arm_rest_timer(min(p.rest_until for p in candidates) - now)
        return [p for p in awake if not p.stuck] or awake

    def _hand_out(self, group: _Group) -> None:
        """Hand the connections waiting in ``group`` to the workers that can take them now.

        The scheduler picks a worker for each connection in turn, exactly as if they came
        one by one; then each worker gets its share in one frame (one ``sendmsg`` carrying
        every descriptor) and answers it once.
        """
        while group.queue and group.timer is None:
            candidates = self._candidates(group)
            if not candidates:
                return
            shares: dict[Peer, list[_Conn]] = {}
            queue, choose = group.queue, group.scheduler.choose
            waiting: collections.deque[_Conn] = collections.deque()
            while queue:
                peer = choose(candidates, queue[0].client)
                if peer is None:
                    if not self._sticky:
                        break  # FIFO: nobody has room
                    # Sticky: this client waits for its worker; the ones behind it need not.
                    waiting.append(queue.popleft())
                    continue
                peer.unacked += 1  # its room is taken now: the next choice must see it
                shares.setdefault(peer, []).append(queue.popleft())
            if waiting:
                queue.extendleft(reversed(waiting))
            if not shares:
                return
            resent = False
            for peer, conns in shares.items():
                for start in range(0, len(conns), MAX_FDS):
                    resent |= not self._send(group, peer, conns[start : start + MAX_FDS])
            if not resent:
                return

    def _send(self, group: _Group, peer: Peer, conns: list[_Conn]) -> bool:
        """One newconn frame to ``peer``; False if it failed, the connections back in line."""
        until = time.monotonic() + self._reroute_after
        batch = _Batch(group, conns, asyncio.get_running_loop().time(), until)
        on_reply = functools.partial(self._answered, peer, batch)
        newconn = group.newconn.plus("until", round(until, 3))
        try:
            batch.seq = peer.channel.ask(newconn, [c.fd for c in conns], on_reply)
        except (ChannelClosed, OSError) as err:
            peer.unacked -= len(conns)
            group.queue.extendleft(reversed(conns))
            if not isinstance(err, ChannelClosed):
                self._back_off(group, err)  # no descriptor left to duplicate them with
            return False  # it just died: it is no candidate any more
        peer.batches[batch.seq] = batch
        self._arm_watchdog()
        return True

    def _answered(self, peer: Peer, batch: _Batch, reply: Frame | None) -> None:
        if reply is not None:
            close_fds(reply.fds)  # a reply never carries any; be sure
        if peer.batches.pop(batch.seq, None) is None:
            # The balancer closed (the connections are closed already), or the answer came
            # after the primary handed them elsewhere (see _reroute).
            if reply is not None and not self._closed:
                self._late_answer(peer, batch, reply)
            return
        count = len(batch.conns)
        peer.unacked -= count
        group = batch.group
        taken = _taken(reply, count)
        malformed = len(taken) != count
        if malformed:
            taken = [False] * count  # settle them as refused, then cut the worker off
        why = None if reply is None else reply.msg.get("why")
        refused = []
        for conn, ok in zip(batch.conns, taken, strict=True):
            if ok:
                conn.close()  # the worker holds its own copy now
            else:
                refused.append(conn)
        took = count - len(refused)
        peer.acked += took
        if self._count_handoffs and took:
            self._count(peer.id, self.accepted.get(peer.id, 0) + took)
        if refused and reply is None:
            if not peer.lost:
                peer.lost = True
                log.warning(
                    "%s is gone with %d connection(s) it had not acknowledged; handing them "
                    "to other workers",
                    peer.name,
                    peer.unacked + count,
                )
        elif not took and why == proto.BUSY:
            self._rest(peer)
        elif not took and why is None and not malformed and group.id in peer.groups:
            # Refused with no reason: it is stopping (busy or late: it still serves the listen).
            peer.groups.discard(group.id)
            log.info(
                "%s refused %s (it is stopping); handing %s to another worker",
                peer.name,
                "a connection" if count == 1 else f"{count} connections",
                "it" if count == 1 else "them",
            )
        if took and peer.rest:
            peer.rest = 0.0
            log.info("%s takes connections again", peer.name)
        if refused:
            self._retry(group, refused)
        self._answering(peer)
        for group_id in {group.id, *peer.groups}:
            self._pump(self._group(group_id))
        if malformed:
            assert reply is not None
            accepted = reply.msg.get("accepted")
            raise ProtocolError(f"newconn answer for {count} connection(s): {accepted!r:.80}")

    def _retry(self, group: _Group, conns: list[_Conn]) -> None:
        """Give connections back to their listen, ahead of the ones accepted after them."""
        if self._closed:
            for conn in conns:
                conn.close()
            return
        group.queue.extendleft(reversed(conns))
        self._hand_out(group)
        if group.closed:
            # Stopping: what no worker took now is closed, as a closing listen would.
            while group.queue:
                group.queue.popleft().close()

    def _pump(self, group: _Group) -> None:
        """Hand out the connections waiting in ``group``, and accept again if there is room."""
        self._hand_out(group)
        self._resume(group)

    # -- stuck workers, and workers out of descriptors ---------------------------------------

    def _answering(self, peer: Peer) -> None:
        if peer.stuck and not peer.batches:
            peer.stuck = False
            if not peer.channel.closed:
                log.info("%s answers again", peer.name)

    def _late_answer(self, peer: Peer, batch: _Batch, reply: Frame) -> None:
        """An answer about connections already handed elsewhere: the worker runs again."""
        if _taken(reply, len(batch.conns)) != [False] * len(batch.conns):
            # It read the frame just before its deadline, then stopped before answering.
            log.warning(
                "%s took %d connection(s) after they were handed to another worker",
                peer.name,
                len(batch.conns),
            )
        self._answering(peer)
        for group_id in peer.groups:
            self._pump(self._group(group_id))

    def _reroute(self, peer: Peer, now: float) -> None:
        """Hand what ``peer`` did not answer for in time to other workers.

        Past ``until`` the worker refuses the frame if it ever reads it, so the primary's copy
        of each connection is the only one that will be served.
        """
        overdue = [b for b in peer.batches.values() if b.until <= now]
        for batch in overdue:
            del peer.batches[batch.seq]
            peer.unacked -= len(batch.conns)
            self._retry(batch.group, batch.conns)
        if overdue:
            log.warning(
                "%s did not answer in %gs: %d connection(s) handed to it go to other workers",
                peer.name,
                self._reroute_after,
                sum(len(b.conns) for b in overdue),
            )

    def _rest(self, peer: Peer) -> None:
        """``peer`` is out of descriptors: hand it nothing for a while, longer each time."""
        first = not peer.rest
        peer.rest = min(_BACKOFF_MAX, peer.rest * 2 or _BACKOFF_FIRST)
        peer.rest_until = time.monotonic() + peer.rest
        if first:
            log.warning(
                "%s cannot take connections (out of descriptors: raise the open-files limit, "
                "ulimit -n); it gets none for %gs, the other workers take them",
                peer.name,
                peer.rest,
            )

    def _arm_rest_timer(self, delay: float) -> None:
        if self._rest_timer is None and not self._closed:
            self._rest_timer = asyncio.get_running_loop().call_later(
                max(0.0, delay), self._after_rest
            )

    def _after_rest(self) -> None:
        self._rest_timer = None
        for group in list(self._groups.values()):
            self._pump(group)

    def _arm_watchdog(self) -> None:
        if self._watchdog is None and not self._closed:
            # Twice per stuck_after: a stuck worker is seen, and routed around, promptly.
            self._watchdog = asyncio.get_running_loop().call_later(
                self._stuck_after / 2, self._check_stuck
            )

    def _check_stuck(self) -> None:
        self._watchdog = None
        now = asyncio.get_running_loop().time()
        waiting = newly_stuck = False
        wall = time.monotonic()
        for peer in list(self._peers.values()):
            if not peer.batches or peer.channel.closed:
                continue
            waiting = True
            since = next(iter(peer.batches.values())).sent
            if not peer.stuck and now - since >= self._stuck_after:
                peer.stuck = newly_stuck = True
                log.warning(
                    "%s has not answered for %.1fs about %d connection(s) handed to it: its "
                    "event loop looks blocked; it gets no new connections until it answers",
                    peer.name,
                    now - since,
                    peer.unacked,
                )
            self._reroute(peer, wall)
        if waiting:
            self._arm_watchdog()
        if newly_stuck:
            for group in list(self._groups.values()):
                self._pump(group)


def _taken(reply: Frame | None, count: int) -> list[bool]:
    """Which of ``count`` connections the worker took, from its answer (None: it is gone).

    ``accepted`` is one bool for the whole frame, or one per descriptor. Anything else is
    taken as a refusal, the safe reading: the connection is handed to another worker. A list
    of the wrong length is returned as it is (the caller settles, then cuts the worker off).
    """
    accepted = None if reply is None else reply.msg.get("accepted")
    if accepted is True:
        return [True] * count
    if isinstance(accepted, list):
        return [ok is True for ok in accepted]
    return [False] * count


def summarize_counts(counts: dict[int, int], *, most: int = 16) -> str:
    """``1=3, 2=2`` for a few workers; past ``most`` a summary that stays one short line."""
    if len(counts) <= most:
        return ", ".join(f"{wid}={n}" for wid, n in sorted(counts.items()))
    ordered = sorted(counts.items(), key=lambda item: (item[1], item[0]))
    (low_id, low), (high_id, high) = ordered[0], ordered[-1]
    median = ordered[len(ordered) // 2][1]
    return (
        f"{sum(counts.values())} over {len(counts)} workers; "
        f"fewest {low} (worker {low_id}), median {median}, most {high} (worker {high_id})"
    )
