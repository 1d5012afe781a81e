"""One drain's budget: a graceful deadline fixed when the drain begins, spent by every step.

Two timeouts that stack are how a stop turns into three times what the operator asked for:
the worker waits ``T`` for its connections, then aiohttp's shutdown waits ``T`` again, then
the primary kills it before the cleanup hooks ran. Here a drain computes its instants once
and every step asks how much is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DrainPlan", "wait_handshakes", "wait_until", "watch_accepted"]

#: How long an idle keep-alive connection may stay open once a drain begins.
IDLE_GRACE = 2.0
#: How long open websockets may finish a message before the cluster closes them (1001).
WS_GRACE = 1.0
#: How long cleanup (``on_cleanup``, ``cleanup_ctx``) may take after the graceful deadline.
CLEANUP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class DrainPlan:
    """The instants of one drain, on the running loop's clock."""

    #: When the drain began.
    began: float
    #: When in-flight work that is still running is cancelled.
    deadline: float
    #: When cleanup must be over: ``deadline`` plus the cleanup allowance.
    cleanup_by: float
    #: Seconds after ``began`` at which open websockets are closed with 1001.
    ws_grace: float = WS_GRACE
    #: Seconds after ``began`` at which idle keep-alive connections are closed.
    idle_grace: float = IDLE_GRACE

    @classmethod
    def starting_now(
        cls,
        graceful_timeout: float,
        *,
        cleanup_timeout: float = CLEANUP_TIMEOUT,
        ws_grace: float = WS_GRACE,
        idle_grace: float = IDLE_GRACE,
    ) -> DrainPlan:
        """A plan that begins now, with ``graceful_timeout`` seconds until the deadline."""
        now = asyncio.get_running_loop().time()
        deadline = now + max(0.0, graceful_timeout)
        return cls(
            began=now,
            deadline=deadline,
            cleanup_by=deadline + max(0.0, cleanup_timeout),
            ws_grace=max(0.0, min(ws_grace, graceful_timeout)),
            idle_grace=max(0.0, min(idle_grace, graceful_timeout)),
        )

    @property
    def graceful_timeout(self) -> float:
        """The seconds from the start of the drain to its deadline."""
        return self.deadline - self.began


async def wait_until(future: asyncio.Future[Any], at: float) -> bool:
    """Wait for ``future`` until the loop time ``at``, never cancelling it; True if it is done.

    Its result or exception stays in it for the caller to take.
    """
    if not future.done():
        delay = at - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.wait({future}, timeout=delay)
    return future.done()


def watch_accepted(server: asyncio.AbstractServer) -> asyncio.Future[None]:
    """A future done once ``server`` is closed and every connection it accepted has ended,
    TLS handshakes still under way included (no protocol has heard of those yet).

    Call it while ``server`` is open: the ``wait_closed()`` of uvloop and of Python 3.11
    returns at once when called after ``close()``, but wakes a waiter registered before it
    when the last accepted transport goes.
    """
    return asyncio.ensure_future(server.wait_closed())


async def wait_handshakes(
    accepted: Sequence[asyncio.Future[None]],
    settled: Callable[[], Awaitable[object]],
    plan: DrainPlan,
) -> None:
    """The last step of a drain's wait: connections accepted before the listens closed whose
    TLS handshake had not finished (so no drain step saw them) get an idle grace to become
    connections, which then end as the others did (``settled()``: none is left).

    A handshake that is still stalled after the grace is cut with the worker, as a slow
    client's request head is; the futures are cancelled at the end either way.
    """
    pending = [future for future in accepted if not future.done()]
    try:
        if pending:
            loop = asyncio.get_running_loop()
            gone = asyncio.ensure_future(asyncio.wait(pending))
            await wait_until(gone, min(plan.deadline, loop.time() + plan.idle_grace))
            gone.cancel()
            ended = asyncio.ensure_future(settled())
            await wait_until(ended, plan.deadline)
            ended.cancel()
    finally:
        for future in accepted:
            future.cancel()
