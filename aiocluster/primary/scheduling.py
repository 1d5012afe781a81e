"""Choosing the worker for a connection the primary accepted (pure).

Nothing here does I/O or reads a clock: the primary's balancer describes its workers as
:class:`Candidate` values and asks a :class:`Scheduler` which one takes the next connection.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

from aiocluster._config import BALANCES, Balance

__all__ = ["Candidate", "Scheduler", "rendezvous_score", "sticky_order"]


class Candidate(Protocol):
    """What the scheduler needs to know of a worker that could take a connection."""

    @property
    def id(self) -> int:
        """The worker id (unique for the cluster's life; a newer worker has a higher id)."""

    @property
    def slot(self) -> int:
        """The worker's slot (a replacement takes the slot of the worker it replaces)."""

    @property
    def load(self) -> int:
        """Connections the worker has open, or has been handed and not yet acknowledged."""

    @property
    def has_room(self) -> bool:
        """False while the worker has as many unacknowledged connections as it may have."""


C = TypeVar("C", bound=Candidate)


def rendezvous_score(client: str, slot: int) -> int:
    """The weight of ``slot`` for ``client`` in rendezvous (highest random weight) hashing.

    Stable across processes and runs (no per-process hash seed), so a client keeps its worker
    slot for as long as that slot is live, whatever happens to the other slots.
    """
    digest = hashlib.blake2b(f"{slot}\0{client}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def sticky_order(client: str, slots: Iterable[int]) -> list[int]:
    """``slots`` from most to least preferred for ``client``.

    The first live slot of this list serves the client: when it dies the client moves to the
    next one, and moves back when the slot is live again. Clients of other slots never move.
    """
    return sorted(set(slots), key=lambda slot: (-rendezvous_score(client, slot), slot))


class Scheduler:
    """Chooses the worker for each connection of one listening handle.

    ``round-robin`` rotates strictly over the workers in slot order, skipping workers without
    room; ``least-conn`` takes the worker with the lowest load, ties going in the same rotation;
    ``sticky`` sends a client address to the first live slot of :func:`sticky_order`, and
    waits (returns None) while that worker has no room rather than break the affinity.
    """

    def __init__(self, balance: Balance = "round-robin", *, sticky: bool = False) -> None:
        if balance not in BALANCES:
            raise ValueError(f"unknown balance {balance!r}; expected one of {BALANCES}")
        self.balance: Balance = balance
        self.sticky = sticky
        self._last: tuple[int, int] = (0, 0)  # (slot, id) of the last worker chosen

    def choose(self, candidates: Iterable[C], client: str | None = None) -> C | None:
        """The worker for the next connection from ``client``; None if it must wait.

        ``client`` is the peer's host address (None when there is none, as on Unix sockets,
        where ``sticky`` cannot apply and the balance decides).
        """
        ordered = sorted(candidates, key=_position)
        if not ordered:
            return None
        if self.sticky and client is not None:
            # Ties in a slot (a replacement started before its predecessor left): the newest.
            best = max(ordered, key=lambda c: (rendezvous_score(client, c.slot), c.id))
            return best if best.has_room else None
        start = bisect.bisect_right([_position(c) for c in ordered], self._last)
        rotation = ordered[start:] + ordered[:start]
        pick = self._pick(rotation)
        if pick is not None:
            self._last = _position(pick)
        return pick

    def _pick(self, rotation: Sequence[C]) -> C | None:
        if self.balance == "least-conn":
            roomy = [c for c in rotation if c.has_room]
            # min() keeps the first of equals: ties rotate instead of piling on one worker.
            return min(roomy, key=lambda c: c.load) if roomy else None
        return next((c for c in rotation if c.has_room), None)


def _position(candidate: Candidate) -> tuple[int, int]:
    return (candidate.slot, candidate.id)
