"""Supervision policy, as pure code: when to restart, how long to wait, when to give up.

The primary feeds it facts (a worker exited, after how long, whether it ever listened) and acts
on its decisions; nothing here touches a process, a clock or a socket, so every rule is tested
without either.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Decision",
    "RestartPolicy",
    "Supervisor",
    "heartbeat_interval",
    "request_limit",
]


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """The numbers behind restart decisions."""

    #: Workers in a row that exit before listening, before the cluster stops (a boot crash loop).
    max_boot_failures: int = 3
    #: The second quick crash in a row waits this long; each further one doubles it.
    backoff_base: float = 0.5
    #: The longest wait between restarts of one slot.
    backoff_max: float = 30.0
    #: A worker that lived this long had a healthy run: its slot's crash streak starts over.
    stable_after: float = 10.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do about a worker that exited."""

    action: Literal["restart", "halt"]
    delay: float = 0.0
    reason: str = ""


@dataclass
class Supervisor:
    """Restart bookkeeping for one cluster: boot failures in a row, crash streaks per slot."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    boot_failures: int = 0
    streaks: dict[int, int] = field(default_factory=dict)

    def listening(self) -> None:
        """A worker started serving: the application can boot, so boot failures start over."""
        self.boot_failures = 0

    def exited(self, slot: int, *, listened: bool, uptime: float) -> Decision:
        """Decide about a worker that exited on its own (not asked to, not during a stop)."""
        if not listened:
            self.boot_failures += 1
            if self.boot_failures >= self.policy.max_boot_failures:
                return Decision(
                    "halt",
                    reason=f"{self.boot_failures} workers in a row exited before listening",
                )
            return Decision("restart", self._backoff(self.boot_failures), "boot failure")
        streak = 1 if uptime >= self.policy.stable_after else self.streaks.get(slot, 0) + 1
        self.streaks[slot] = streak
        return Decision("restart", self._backoff(streak), f"crash {streak} in a row")

    def forget(self, slot: int) -> None:
        """The slot is gone (scaled down): drop its history."""
        self.streaks.pop(slot, None)

    def _backoff(self, attempt: int) -> float:
        # The first failure restarts at once: most crashes are one-offs.
        if attempt <= 1:
            return 0.0
        delay: float = self.policy.backoff_base * 2.0 ** (attempt - 2)
        return min(delay, self.policy.backoff_max)


def heartbeat_interval(timeout: float) -> float:
    """How often a worker's loop reports: often enough to be seen hung within ``timeout``."""
    if timeout <= 0:
        return 1.0
    return min(1.0, timeout / 4)


def request_limit(max_requests: int, jitter: int, rng: random.Random | None = None) -> int:
    """A worker's request budget: ``max_requests`` plus up to ``jitter`` more (0: no limit).

    The jitter keeps workers started together from all retiring at the same moment.
    """
    if max_requests <= 0:
        return 0
    return max_requests + ((rng or random).randint(0, jitter) if jitter > 0 else 0)


def free_slot(used: set[int]) -> int:
    """The smallest slot number (from 1) not in ``used``."""
    slot = 1
    while slot in used:
        slot += 1
    return slot
