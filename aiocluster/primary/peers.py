"""The balancer's per-worker bookkeeping (policy ``rr``): what each worker holds unanswered.

A :class:`Peer` is one worker as the balancer sees it; :class:`Peers` keeps them all, and with
them the hand-off window: the ``newconn`` batches each worker has not answered yet, how its
answers settle them, the watchdog that marks a worker whose loop is stuck and re-routes what
it did not answer for in time, the rest given to a worker out of descriptors, and the
per-worker counts. Accepting, queueing and choosing stay in :mod:`aiocluster.primary.balancer`,
which these call back to give connections back to their listen (``retry``) and to hand out
again (``pump_all``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import NamedTuple

from aiocluster.wire import messages as proto
from aiocluster.wire.channel import Channel
from aiocluster.wire.codec import Frame

__all__ = ["Batch", "Conn", "Peer", "Peers", "Settled", "summarize_counts"]

log = logging.getLogger("aiocluster.primary")

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0


class Conn:
    """An accepted connection the primary holds until a worker has acknowledged it.

    A bare descriptor, not a socket object: the primary never reads or writes it.
    """

    __slots__ = ("client", "fd")

    def __init__(self, fd: int, client: str | None) -> None:
        self.fd = fd
        self.client = client

    def close(self) -> None:
        """Close the primary's copy."""
        # Not contextlib.suppress: this runs for every connection, and it costs twice as much.
        try:  # noqa: SIM105
            os.close(self.fd)
        except OSError:
            pass


class Batch:
    """Connections of one listen (``group_id``) handed to one worker in one ``newconn`` frame.

    ``until`` (``time.monotonic()``, the same clock in every process): the worker refuses the
    frame if it reads it later than that, so past it the primary may hand them elsewhere.
    """

    __slots__ = ("conns", "group_id", "sent", "seq", "until")

    def __init__(self, group_id: int, conns: list[Conn], sent: float, until: float) -> None:
        self.group_id = group_id
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
        self.batches: dict[int, Batch] = {}
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


class Settled(NamedTuple):
    """What an answer settled: the connections to hand elsewhere, and whether it was garbage."""

    refused: list[Conn]
    #: One verdict per descriptor, of the wrong length: settled as refused; cut the worker off.
    malformed: bool


class Peers:
    """Every worker the balancer may hand connections to, and what each has not answered.

    ``retry(group_id, conns)`` gives connections back to their listen; ``pump_all()`` hands
    out what every listen holds (a worker became a candidate again, or stopped being one).
    """

    def __init__(
        self,
        *,
        max_unacked: int,
        stuck_after: float,
        reroute_after: float,
        count_handoffs: bool,
        on_count: Callable[[int, int], None] | None,
        retry: Callable[[int, list[Conn]], None],
        pump_all: Callable[[], None],
    ) -> None:
        #: Connections accepted by each worker (by id), dead ones included.
        self.accepted: dict[int, int] = {}
        self._max_unacked = max_unacked
        self._stuck_after = stuck_after
        self._reroute_after = reroute_after
        self._count_handoffs = count_handoffs
        self._on_count = on_count
        self._retry = retry
        self._pump_all = pump_all
        self._peers: dict[int, Peer] = {}
        self._rest_timer: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    def join(self, worker_id: int, slot: int, name: str, channel: Channel, group_id: int) -> None:
        """The worker serves the listen ``group_id`` (a new peer if its channel is new)."""
        peer = self._peers.get(worker_id)
        if peer is None or peer.channel is not channel:
            peer = Peer(worker_id, slot, name, channel, self._max_unacked)
            self._peers[worker_id] = peer
        peer.groups.add(group_id)
        self.accepted.setdefault(worker_id, 0)

    def part(self, worker_id: int, group_id: int) -> None:
        """The worker stopped serving ``group_id``."""
        peer = self._peers.get(worker_id)
        if peer is not None:
            peer.groups.discard(group_id)

    def tracks(self, worker_id: int) -> bool:
        """True while the worker has a peer here (it serves, or hand-offs are unsettled)."""
        return worker_id in self._peers

    def groups_of(self, worker_id: int) -> list[int]:
        """The listens (handle ids) the worker serves, sorted."""
        peer = self._peers.get(worker_id)
        return sorted(peer.groups) if peer is not None else []

    def settled(self) -> bool:
        """True when no hand-off awaits its answer."""
        return not any(peer.batches for peer in self._peers.values())

    def forget(self, worker_id: int) -> None:
        """The worker exited: drop its peer, unless hand-offs to it are still to be settled
        (then :meth:`candidates` drops it once they are)."""
        peer = self._peers.get(worker_id)
        if peer is not None and not peer.batches:
            del self._peers[worker_id]

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

    def candidates(self, group_id: int) -> list[Peer]:
        """The workers that may be handed a connection of ``group_id`` now."""
        candidates = []
        for peer in list(self._peers.values()):
            if peer.channel.closed:
                if not peer.batches:
                    del self._peers[peer.id]  # a dead worker with nothing left to settle
            elif group_id in peer.groups:
                candidates.append(peer)
        # A worker whose loop is stuck gets nothing new until it answers (under sticky its
        # clients move to their next slot); one out of descriptors nothing until its back-off
        # ends. If every worker is stuck, the stuck ones still beat a queue nobody serves.
        now = time.monotonic()
        awake = [p for p in candidates if p.rest_until <= now]
        if len(awake) < len(candidates):
            self._arm_rest_timer(min(p.rest_until for p in candidates) - now)
        return [p for p in awake if not p.stuck] or awake

    def sent(self, peer: Peer, batch: Batch) -> None:
        """``batch`` went to ``peer``: it is unanswered until :meth:`settle` or re-routing."""
        peer.batches[batch.seq] = batch
        self._arm_watchdog()

    def close(self) -> None:
        """Close every connection handed and not answered for; log the per-worker counts."""
        self._closed = True
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

    # -- answers -----------------------------------------------------------------------------

    def settle(self, peer: Peer, batch: Batch, reply: Frame | None) -> Settled | None:
        """Account for ``peer``'s answer to ``batch`` (None: it is gone).

        Returns None if the batch was no longer pending (closed, or re-routed already: see
        :meth:`late_answer`); else the refused connections, to hand to another worker.
        """
        if peer.batches.pop(batch.seq, None) is None:
            return None
        count = len(batch.conns)
        peer.unacked -= count
        taken = _taken(reply, count)
        malformed = len(taken) != count
        if malformed:
            taken = [False] * count  # settle them as refused, then cut the worker off
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
        self._say_why(peer, batch, reply, refused=bool(refused), took=took, malformed=malformed)
        if took and peer.rest:
            peer.rest = 0.0
            log.info("%s takes connections again", peer.name)
        return Settled(refused, malformed)

    def _say_why(
        self,
        peer: Peer,
        batch: Batch,
        reply: Frame | None,
        *,
        refused: bool,
        took: int,
        malformed: bool,
    ) -> None:
        """Act on why the worker refused (gone, out of descriptors, stopping), and say it."""
        count = len(batch.conns)
        why = None if reply is None else reply.msg.get("why")
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
        elif not took and why is None and not malformed and batch.group_id in peer.groups:
            # Refused with no reason: it is stopping (busy or late: it still serves the listen).
            peer.groups.discard(batch.group_id)
            log.info(
                "%s refused %s (it is stopping); handing %s to another worker",
                peer.name,
                "a connection" if count == 1 else f"{count} connections",
                "it" if count == 1 else "them",
            )

    def answering(self, peer: Peer) -> None:
        """``peer`` answered: no longer stuck once nothing it was handed is unanswered."""
        if peer.stuck and not peer.batches:
            peer.stuck = False
            if not peer.channel.closed:
                log.info("%s answers again", peer.name)

    def late_answer(self, peer: Peer, batch: Batch, reply: Frame) -> None:
        """An answer about connections already handed elsewhere: the worker runs again."""
        if _taken(reply, len(batch.conns)) != [False] * len(batch.conns):
            # It read the frame just before its deadline, then stopped before answering.
            log.warning(
                "%s took %d connection(s) after they were handed to another worker",
                peer.name,
                len(batch.conns),
            )
        self.answering(peer)

    # -- stuck workers, and workers out of descriptors ---------------------------------------

    def _reroute(self, peer: Peer, now: float) -> None:
        """Hand what ``peer`` did not answer for in time to other workers.

        Past ``until`` the worker refuses the frame if it ever reads it, so the primary's copy
        of each connection is the only one that will be served.
        """
        overdue = [b for b in peer.batches.values() if b.until <= now]
        for batch in overdue:
            del peer.batches[batch.seq]
            peer.unacked -= len(batch.conns)
            self._retry(batch.group_id, batch.conns)
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
        peer.rest = min(BACKOFF_MAX, peer.rest * 2 or BACKOFF_FIRST)
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
        self._pump_all()

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
            self._pump_all()


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
