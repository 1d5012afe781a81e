"""The primary's connection handoff: accept loops for policy ``rr``, slot drains, counters.

Under ``rr`` only the primary accepts. Each connection goes to one worker, chosen for it alone
by the scheduler; what one wake-up accepted goes out as one ``newconn`` frame per worker,
carrying the descriptors of that worker's share, answered once. The primary keeps its own copy
of each connection until the worker says it took it: a connection the worker refuses, or that
was in flight when the worker died, goes to another worker instead of being lost. A worker
has at most ``max_unacked`` connections unanswered (eight full frames), so one whose event loop
is stuck gets no more. Connections that no worker can take yet wait in the primary, at most
``max_queued`` per listen (:func:`queue_depth`: up to 4,096, deep enough to empty the kernel's
accept queue in a burst); past that the primary stops accepting and the kernel's backlog
holds the rest.

The same handoff serves a scale-down under ``reuseport``: the primary accepts what the kernel
queued on a retired slot's socket and hands it to the remaining workers (:meth:`drain`).

This module accepts, queues and chooses; what each worker holds unanswered, the stuck-worker
watchdog and re-routing are :mod:`aiocluster.primary.peers`'.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import resource
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from aiocluster._config import Balance
from aiocluster._errors import ChannelClosed, ProtocolError
from aiocluster.primary.handles import Handle
from aiocluster.primary.peers import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    Batch,
    Conn,
    Peer,
    Peers,
    summarize_counts,
)
from aiocluster.primary.scheduling import Scheduler
from aiocluster.wire import messages as proto
from aiocluster.wire.channel import Channel
from aiocluster.wire.codec import MAX_FDS, Frame, Prepared
from aiocluster.wire.fds import close_fds
from aiocluster.wire.sockets import ACCEPT_CLIENT_ERRORS

__all__ = ["Balancer", "Peer", "client_key", "summarize_counts"]

log = logging.getLogger("aiocluster.primary")

# Accepts per readiness callback: a burst goes in one wakeup (the primary's accept loop is the
# ceiling of policy rr), bounded so the channels and timers of the primary still get their turn.
_ACCEPT_BATCH = 128
# newconn frames a worker may leave unanswered (see Balancer).
_WINDOW_FRAMES = 8
# Connections waiting in the primary per listen, at most (and at most a quarter of its
# open-files limit, see queue_depth).
_MAX_QUEUED = 4096


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


def queue_depth() -> int:
    """How many accepted connections a listen may hold in the primary, waiting for a worker.

    Deep enough to empty the kernel's accept queue in a burst (a full one drops the clients'
    handshakes, which retry only after 1 s, then 3 s), and at most a quarter of the primary's
    open-files limit, so that a burst alone does not run it out of descriptors.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _MAX_QUEUED
    return max(64, min(_MAX_QUEUED, soft // 4))


def client_key(family: int, address: Any) -> str | None:
    """The client's host address for sticky hashing; None where there is none (Unix sockets)."""
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        return str(address[0])
    return None


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
        self.queue: collections.deque[Conn] = collections.deque()
        #: The socket the primary accepts on (policy rr); None when it only drains.
        self.handle: Handle | None = None
        self.reading = False
        self.closed = False
        self.backoff = 0.0
        self.timer: asyncio.TimerHandle | None = None
        #: The newconn request for this listen, encoded once: only its seq changes.
        self.newconn = Prepared({"act": proto.NEWCONN, "handle": group_id})

    def accept(self, handle: Handle, limit: int | None, sticky: bool) -> tuple[int, OSError | None]:
        """Accept onto the queue until none is waiting or ``limit`` (None: no limit).

        Returns how many, and the error that stopped it (out of descriptors, say), if any. A
        connection that failed on the client's side is skipped.
        """
        accept, family = _accepter(handle.sock), handle.sock.family
        queue = self.queue
        count = 0
        while limit is None or count < limit:
            try:
                fd, address = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                if err.errno in ACCEPT_CLIENT_ERRORS:
                    continue
                return count, err
            # The client's address matters only to sticky: don't compute it for nothing.
            queue.append(Conn(fd, client_key(family, address) if sticky else None))
            count += 1
        return count, None

    def resume(self, max_queued: int, on_readable: Callable[[_Group], None]) -> None:
        """Accept again, unless closed, backing off, or ``max_queued`` are waiting already."""
        if self.closed or self.handle is None or self.reading or self.timer is not None:
            return
        if len(self.queue) >= max_queued:
            return
        asyncio.get_running_loop().add_reader(self.handle.sock.fileno(), on_readable, self)
        self.reading = True

    def pause(self) -> None:
        """Stop accepting (the kernel's backlog holds what comes meanwhile)."""
        if self.reading and self.handle is not None:
            asyncio.get_running_loop().remove_reader(self.handle.sock.fileno())
        self.reading = False

    def back_off(self, err: OSError, then: Callable[[_Group], None]) -> None:
        """Out of descriptors (or memory): stop accepting for a while instead of spinning."""
        self.pause()
        if self.timer is not None:
            return
        first = not self.backoff
        self.backoff = min(BACKOFF_MAX, self.backoff * 2 or BACKOFF_FIRST)
        if first:
            where = self.handle.describe() if self.handle is not None else f"listen {self.id}"
            log.warning(
                "cannot take connections on %s: %s; pausing accepts for %gs (they wait in the "
                "kernel's backlog meanwhile; raise the open-files limit, ulimit -n)",
                where,
                err,
                self.backoff,
            )
        self.timer = asyncio.get_running_loop().call_later(self.backoff, then, self)

    def close(self) -> None:
        """Stop accepting for good, and close the connections no worker took."""
        self.pause()
        self.closed = True
        self.handle = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.queue:
            log.info("closing %d connection(s) no worker took before the stop", len(self.queue))
        while self.queue:
            self.queue.popleft().close()


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
        # Eight full newconn frames in flight per worker. With one (16 connections) a burst
        # went out at 16 per worker per round trip through a busy worker's loop, the primary
        # stopped accepting, the kernel's accept queue overflowed and clients waited for SYN
        # retransmits (1 s, 3 s...): 800 of 5,000 connections timed out (run.py --measure burst).
        max_unacked: int = _WINDOW_FRAMES * MAX_FDS,
        max_queued: int | None = None,
        stuck_after: float = 1.0,
        reroute_after: float = 2.0,
        on_count: Callable[[int, int], None] | None = None,
    ) -> None:
        self._balance: Balance = balance
        self._sticky = sticky
        self._max_queued = queue_depth() if max_queued is None else max_queued
        self._reroute_after = reroute_after
        self._peers = Peers(
            max_unacked=max_unacked,
            stuck_after=stuck_after,
            reroute_after=reroute_after,
            count_handoffs=count_handoffs,
            on_count=on_count,
            retry=self._retry,
            pump_all=self._pump_all,
        )
        #: Connections accepted by each worker (by id), dead ones included.
        self.accepted: dict[int, int] = self._peers.accepted
        self._groups: dict[int, _Group] = {}
        self._closed = False
        # Accepting is held while an upgrade quiesces the primary (see hold()).
        self._held = False

    # -- workers -----------------------------------------------------------------------------

    def join(self, worker_id: int, slot: int, name: str, channel: Channel, group_id: int) -> None:
        """A worker now serves the listen ``group_id``: it may be handed its connections."""
        self._peers.join(worker_id, slot, name, channel, group_id)
        self._pump(self._group(group_id))

    def part(self, worker_id: int, group_id: int) -> None:
        """The worker stopped serving ``group_id``: hand it no more of its connections."""
        self._peers.part(worker_id, group_id)

    def forget(self, worker_id: int) -> None:
        """The worker exited: nothing of it is kept but its count of accepted connections."""
        self._peers.forget(worker_id)

    def tracks(self, worker_id: int) -> bool:
        """True while the balancer keeps anything of the worker but its count."""
        return self._peers.tracks(worker_id)

    def report(self, worker_id: int, *, accepted: int, open_: int, adopted: int) -> None:
        """What the worker says it accepted in all, has open, and adopted from the primary."""
        self._peers.report(worker_id, accepted=accepted, open_=open_, adopted=adopted)

    def groups_of(self, worker_id: int) -> list[int]:
        """The listens (handle ids) the worker serves under rr."""
        return self._peers.groups_of(worker_id)

    # -- quiescing (an in-place upgrade of the primary) -------------------------------------

    def hold(self) -> None:
        """Stop accepting on every listen: new connections wait in the kernel's backlog.

        Hand-offs under way go on; :meth:`settled` says when all are answered."""
        self._held = True
        for group in self._groups.values():
            group.pause()

    def settled(self) -> bool:
        """True once nothing accepted waits in the primary and every hand-off is answered."""
        return self._peers.settled() and not any(g.queue for g in self._groups.values())

    def release(self) -> None:
        """Accept again after :meth:`hold` (the upgrade was refused)."""
        self._held = False
        self._pump_all()

    # -- listens -----------------------------------------------------------------------------

    def serve(self, handle: Handle) -> None:
        """Accept on ``handle`` in the primary (policy rr) and hand out what it accepts."""
        group = self._group(handle.id)
        if group.handle is handle or self._closed:
            return
        group.handle = handle
        group.closed = False
        handle.on_close(group.close)
        if not self._held:
            group.resume(self._max_queued, self._on_readable)

    def drain(self, handles: Iterable[Handle]) -> int:
        """Accept what is queued on ``handles``, hand it to the workers, close the handles.

        For a scale-down under ``reuseport``: call it once the slot's worker has exited, so
        the primary's copy is the last one; the connections the kernel queued on the slot's
        socket are then served by the other workers rather than reset. Returns their number.
        """
        handed = 0
        for handle in handles:
            group = self._group(handle.id)
            count, failed = group.accept(handle, None, self._sticky)
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
            group.close()
        self._peers.close()

    # -- accepting ---------------------------------------------------------------------------

    def _group(self, group_id: int) -> _Group:
        group = self._groups.get(group_id)
        if group is None:
            scheduler = Scheduler(self._balance, sticky=self._sticky)
            group = self._groups[group_id] = _Group(group_id, scheduler)
        return group

    def _on_readable(self, group: _Group) -> None:
        """Accept what is there (up to a batch), then hand it all out: one frame per worker."""
        handle = group.handle
        if handle is None or group.closed:
            return
        room = self._max_queued - len(group.queue)
        _count, failed = group.accept(handle, min(_ACCEPT_BATCH, room), self._sticky)
        if group.backoff and failed is None:
            group.backoff = 0.0
            log.info("accepting on %s again", handle.describe())
        self._hand_out(group)
        if failed is not None:
            group.back_off(failed, self._after_backoff)
        elif len(group.queue) >= self._max_queued:
            group.pause()  # the kernel's backlog holds the rest until workers take some

    def _after_backoff(self, group: _Group) -> None:
        group.timer = None
        self._pump(group)

    # -- handing over ------------------------------------------------------------------------

    def _hand_out(self, group: _Group) -> None:
        """Hand the connections waiting in ``group`` to the workers that can take them now.

        The scheduler picks a worker for each connection in turn, exactly as if they came
        one by one; then each worker gets its share in one frame (one ``sendmsg`` carrying
        every descriptor) and answers it once.
        """
        while group.queue and group.timer is None:
            candidates = self._peers.candidates(group.id)
            if not candidates:
                return
            shares: dict[Peer, list[Conn]] = {}
            queue, choose = group.queue, group.scheduler.choose
            waiting: collections.deque[Conn] = collections.deque()
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
            held_back: list[Conn] = []
            for peer, conns in shares.items():
                # Unanswered before this round: past one frame's worth, only full frames go,
                # so a steady trickle (a connection per request) still waits for the answer
                # and goes out batched, as with a window of one frame; a burst fills frames.
                before = peer.unacked - len(conns)
                for start in range(0, len(conns), MAX_FDS):
                    frame = conns[start : start + MAX_FDS]
                    if before >= MAX_FDS and len(frame) < MAX_FDS:
                        peer.unacked -= len(frame)
                        held_back += frame
                        break
                    resent |= not self._send(group, peer, frame)
                    before += len(frame)
            if held_back:
                queue.extendleft(reversed(held_back))  # next, once an answer makes room
            if not resent:
                return

    def _send(self, group: _Group, peer: Peer, conns: list[Conn]) -> bool:
        """One newconn frame to ``peer``; False if it failed, the connections back in line."""
        until = time.monotonic() + self._reroute_after
        batch = Batch(group.id, conns, asyncio.get_running_loop().time(), until)
        on_reply = functools.partial(self._answered, peer, batch)
        newconn = group.newconn.plus("until", round(until, 3))
        try:
            batch.seq = peer.channel.ask(newconn, [c.fd for c in conns], on_reply)
        except (ChannelClosed, OSError) as err:
            peer.unacked -= len(conns)
            group.queue.extendleft(reversed(conns))
            if not isinstance(err, ChannelClosed):
                # No descriptor left to duplicate them with.
                group.back_off(err, self._after_backoff)
            return False  # it just died: it is no candidate any more
        self._peers.sent(peer, batch)
        return True

    def _answered(self, peer: Peer, batch: Batch, reply: Frame | None) -> None:
        if reply is not None:
            close_fds(reply.fds)  # a reply never carries any; be sure
        settled = self._peers.settle(peer, batch, reply)
        if settled is None:
            # The balancer closed (the connections are closed already), or the answer came
            # after the primary handed them elsewhere (re-routed by the peers' watchdog).
            if reply is not None and not self._closed:
                self._peers.late_answer(peer, batch, reply)
                for group_id in peer.groups:
                    self._pump(self._group(group_id))
            return
        if settled.refused:
            self._retry(batch.group_id, settled.refused)
        self._peers.answering(peer)
        for group_id in {batch.group_id, *peer.groups}:
            self._pump(self._group(group_id))
        if settled.malformed:
            assert reply is not None
            accepted = reply.msg.get("accepted")
            count = len(batch.conns)
            raise ProtocolError(f"newconn answer for {count} connection(s): {accepted!r:.80}")

    def _retry(self, group_id: int, conns: list[Conn]) -> None:
        """Give connections back to their listen, ahead of the ones accepted after them."""
        if self._closed:
            for conn in conns:
                conn.close()
            return
        group = self._group(group_id)
        group.queue.extendleft(reversed(conns))
        self._hand_out(group)
        if group.closed:
            # Stopping: what no worker took now is closed, as a closing listen would.
            while group.queue:
                group.queue.popleft().close()

    def _pump(self, group: _Group) -> None:
        """Hand out the connections waiting in ``group``, and accept again if there is room."""
        self._hand_out(group)
        if not self._held:
            group.resume(self._max_queued, self._on_readable)

    def _pump_all(self) -> None:
        for group in list(self._groups.values()):
            self._pump(group)
