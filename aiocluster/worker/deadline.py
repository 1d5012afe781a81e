"""One drain's budget: a graceful deadline fixed when the drain begins, spent by every step.

Two timeouts that stack are how a stop turns into three times what the operator asked for:
the worker waits ``T`` for its connections, then aiohttp's shutdown waits ``T`` again, then
the primary kills it before the cleanup hooks ran. Here a drain computes its instants once
and every step asks how much is left.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

__all__ = ["DrainPlan", "wait_until"]

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
