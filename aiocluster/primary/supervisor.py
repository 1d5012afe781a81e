"""Supervision policy, as pure code: when to restart, how long to wait, when to give up.

The primary feeds it facts (a worker exited, after how long, whether it ever listened, what the
cluster was doing then) and acts on its :class:`Verdict`; nothing here touches a process, a
clock or a socket, so every rule is tested without either.
"""

from __future__ import annotations

import logging
import random
import signal
from dataclasses import dataclass, field
from typing import Literal

from aiocluster._errors import APP_ERROR_STATUS

__all__ = [
    "Decision",
    "ExitFacts",
    "RestartPolicy",
    "Supervisor",
    "Verdict",
    "describe_exit",
    "free_slot",
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


@dataclass(frozen=True, slots=True)
class ExitFacts:
    """What the primary knows when a worker has exited (the worker no longer counted live)."""

    #: How logs name the worker (``worker 3 (pid 1234)``), and its exit status (negative: the
    #: signal that killed it).
    name: str
    returncode: int
    slot: int
    #: It reported a listen at some point; how long it ran.
    listened: bool
    uptime: float
    #: The cluster's size, and whether a stop was asked for.
    size: int
    stopping: bool = False
    #: It was asked to leave (disconnect, kill): its exit is expected.
    expected: bool = False
    #: It was being replaced (reload, recycling) and its successor is still starting.
    retiring: bool = False
    #: It was a replacement for the worker so named, and never listened.
    replacing: str | None = None
    #: Another live worker has its slot; one that serves (not draining, not leaving) has it.
    slot_taken: bool = False
    slot_served: bool = False
    #: Policy reuseport: the slot has sockets of its own, which a slot scaled away must drain.
    reuseport: bool = False
    #: Every worker was listening at some point: the cluster has served.
    ready_once: bool = False
    #: The primary killed it for a fault of its own (hung, broke the channel protocol).
    faulted: bool = False
    #: Other workers listening now (the primary always says; 1 keeps older callers' meaning).
    others_listening: int = 1


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do about a worker that exited: the log line (or the failure), and what next.

    ``ignore``: log ``message`` at ``level``, nothing more. ``restart``: log it, start a worker
    in the slot after ``delay`` seconds. ``halt``: the cluster fails with ``message``. In every
    case ``drain_slot``: first hand what the slot's own sockets queued to the others.
    """

    action: Literal["ignore", "restart", "halt"]
    message: str
    level: int = logging.INFO
    delay: float = 0.0
    drain_slot: bool = False
    #: For ``halt``: the exit status the cluster ends with (2: the application cannot load).
    status: int = 1


@dataclass
class Supervisor:
    """Restart bookkeeping for one cluster: boot failures in a row, crash streaks per slot."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    boot_failures: int = 0
    streaks: dict[int, int] = field(default_factory=dict)

    def listening(self) -> None:
        """A worker started serving: the application can boot, so boot failures start over."""
        self.boot_failures = 0

    def exited(self, slot: int, *, listened: bool, uptime: float, killed: bool = False) -> Decision:
        """Decide about a worker that exited on its own (not asked to, not during a stop).

        ``killed``: it was serving and a signal from outside ended it (the OOM killer, an
        operator): a healthy worker's death, restarted at once and no part of a crash streak.
        """
        if listened and killed:
            return Decision("restart", 0.0, "killed while serving: not a crash")
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

    def decide(self, facts: ExitFacts) -> Verdict:
        """The one rule for every exit; only an unexpected one counts toward a restart."""
        # Scaled down: what the kernel queued on the slot's sockets is served by the others.
        drain = (
            facts.reuseport
            and facts.slot > facts.size
            and not facts.stopping
            and not facts.slot_taken
        )
        ended = f"{facts.name} {describe_exit(facts.returncode)}"
        if facts.stopping or facts.expected:
            return Verdict("ignore", ended, logging.INFO, drain_slot=drain)
        if facts.retiring:
            message = f"{ended} while its successor starts"
            return Verdict("ignore", message, logging.WARNING, drain_slot=drain)
        if facts.replacing is not None:
            # A replacement that never listened: the worker it was to replace keeps serving.
            message = f"{ended} before it was listening; {facts.replacing} keeps serving"
            return Verdict("ignore", message, logging.ERROR, drain_slot=drain)
        if facts.slot > facts.size or facts.slot_served:
            message = f"{ended}; its slot is not needed any more"
            return Verdict("ignore", message, logging.WARNING, drain_slot=drain)
        if facts.returncode == APP_ERROR_STATUS and not facts.listened and not facts.ready_once:
            # The worker said the application cannot load: no retry can fix that. Once the
            # cluster has served, the same exit is a boot failure like any (new code on disk
            # broke a restart: the others keep serving while it retries, then halts).
            message = f"{ended}: it cannot load the application; stopping the cluster"
            return Verdict("halt", message, logging.ERROR, drain_slot=drain, status=2)
        killed = not facts.faulted and facts.returncode in _OUTSIDE_KILLS
        decision = self.exited(
            facts.slot, listened=facts.listened, uptime=facts.uptime, killed=killed
        )
        if decision.action == "restart" and decision.delay and facts.others_listening <= 0:
            # A back-off protects the machine from a crash loop, never at the price of an
            # outage: with nobody else listening this slot is refilled now.
            decision = Decision("restart", 0.0, f"{decision.reason}; no other worker listening")
        if decision.action == "halt":
            message = (
                f"{ended} before it was listening, and {decision.reason}: "
                "the application cannot start (see its error above); stopping the cluster"
            )
            return Verdict("halt", message, logging.ERROR, drain_slot=drain)
        when = "at once" if not decision.delay else f"in {decision.delay:g}s"
        what = "unexpectedly" if facts.listened else "before it was listening"
        message = f"{ended} {what}; restarting slot {facts.slot} {when} ({decision.reason})"
        return Verdict("restart", message, logging.WARNING, decision.delay, drain)

    def forget(self, slot: int) -> None:
        """The slot is gone (scaled down): drop its history."""
        self.streaks.pop(slot, None)

    def _backoff(self, attempt: int) -> float:
        # The first failure restarts at once: most crashes are one-offs.
        if attempt <= 1:
            return 0.0
        delay: float = self.policy.backoff_base * 2.0 ** (attempt - 2)
        return min(delay, self.policy.backoff_max)


# Signals that come from outside a process (the OOM killer's SIGKILL, an operator's kill): a
# worker ended by one did not crash. SIGSEGV, SIGABRT and the like are the worker's own doing.
_OUTSIDE_KILLS = frozenset(
    -sig for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
)


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


def describe_exit(returncode: int) -> str:
    """``exited with code 1``, ``was killed by SIGKILL``: how logs say a worker ended."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


def free_slot(used: set[int]) -> int:
    """The smallest slot number (from 1) not in ``used``."""
    slot = 1
    while slot in used:
        slot += 1
    return slot
