"""The restart policy as pure code: no processes, no clock."""

from __future__ import annotations

import random

from aiocluster.primary.supervisor import (
    RestartPolicy,
    Supervisor,
    free_slot,
    heartbeat_interval,
    request_limit,
)


def test_first_crash_restarts_at_once_then_backs_off_exponentially() -> None:
    sup = Supervisor(RestartPolicy(backoff_base=0.5, backoff_max=4, stable_after=10))
    delays = [sup.exited(1, listened=True, uptime=0.2).delay for _ in range(7)]
    assert delays == [0, 0.5, 1, 2, 4, 4, 4]


def test_a_stable_run_resets_the_streak() -> None:
    sup = Supervisor(RestartPolicy(stable_after=10))
    for _ in range(4):
        sup.exited(1, listened=True, uptime=1)
    decision = sup.exited(1, listened=True, uptime=11)
    assert decision.action == "restart"
    assert decision.delay == 0
    assert sup.exited(1, listened=True, uptime=1).delay == RestartPolicy().backoff_base


def test_slots_have_their_own_streaks() -> None:
    sup = Supervisor()
    for _ in range(3):
        sup.exited(1, listened=True, uptime=0)
    assert sup.exited(2, listened=True, uptime=0).delay == 0
    sup.forget(1)
    assert sup.exited(1, listened=True, uptime=0).delay == 0


def test_crashes_after_listening_never_halt() -> None:
    sup = Supervisor(RestartPolicy(backoff_max=30))
    decisions = [sup.exited(1, listened=True, uptime=0) for _ in range(50)]
    assert {d.action for d in decisions} == {"restart"}
    assert decisions[-1].delay == 30


def test_boot_failures_in_a_row_halt() -> None:
    sup = Supervisor(RestartPolicy(max_boot_failures=3))
    first = sup.exited(1, listened=False, uptime=0)
    second = sup.exited(2, listened=False, uptime=0)
    third = sup.exited(1, listened=False, uptime=0)
    assert (first.action, first.delay) == ("restart", 0)
    assert second.action == "restart"
    assert second.delay > 0
    assert third.action == "halt"
    assert "3 workers in a row" in third.reason


def test_a_worker_that_listens_resets_boot_failures() -> None:
    sup = Supervisor(RestartPolicy(max_boot_failures=2))
    assert sup.exited(1, listened=False, uptime=0).action == "restart"
    sup.listening()
    assert sup.exited(1, listened=False, uptime=0).action == "restart"
    assert sup.exited(1, listened=False, uptime=0).action == "halt"


def test_heartbeat_interval() -> None:
    assert heartbeat_interval(30) == 1.0
    assert heartbeat_interval(2) == 0.5
    assert heartbeat_interval(0) == 1.0  # hang detection off: beats still carry the stats


def test_request_limit_with_jitter() -> None:
    rng = random.Random(7)
    limits = {request_limit(100, 10, rng) for _ in range(200)}
    assert min(limits) >= 100
    assert max(limits) <= 110
    assert len(limits) > 5
    assert request_limit(0, 10, rng) == 0
    assert request_limit(50, 0, rng) == 50


def test_free_slot() -> None:
    assert free_slot(set()) == 1
    assert free_slot({1, 2, 4}) == 3
    assert free_slot({1, 2, 3}) == 4
