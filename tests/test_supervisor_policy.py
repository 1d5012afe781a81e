"""The restart policy as pure code: no processes, no clock."""

from __future__ import annotations

import dataclasses
import logging
import random

import pytest

from aiocluster.primary.supervisor import (
    ExitFacts,
    RestartPolicy,
    Supervisor,
    describe_exit,
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


def test_describe_exit() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(-15) == "was killed by SIGTERM"
    assert describe_exit(-200) == "was killed by signal 200"


def test_free_slot() -> None:
    assert free_slot(set()) == 1
    assert free_slot({1, 2, 4}) == 3
    assert free_slot({1, 2, 3}) == 4


# --- what to do about an exit -------------------------------------------------------------------

CRASH = ExitFacts(name="worker 3 (pid 99)", returncode=1, slot=2, listened=True, uptime=60, size=2)


def facts(**changes: object) -> ExitFacts:
    return dataclasses.replace(CRASH, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "level", "message"),
    [
        ({"stopping": True}, logging.INFO, "worker 3 (pid 99) exited with code 1"),
        ({"expected": True}, logging.INFO, "worker 3 (pid 99) exited with code 1"),
        (
            {"retiring": True},
            logging.WARNING,
            "worker 3 (pid 99) exited with code 1 while its successor starts",
        ),
        (
            {"replacing": "worker 1 (pid 7)", "listened": False},
            logging.ERROR,
            "worker 3 (pid 99) exited with code 1 before it was listening; "
            "worker 1 (pid 7) keeps serving",
        ),
        (
            {"size": 1},
            logging.WARNING,
            "worker 3 (pid 99) exited with code 1; its slot is not needed any more",
        ),
        (
            {"slot_taken": True, "slot_served": True},
            logging.WARNING,
            "worker 3 (pid 99) exited with code 1; its slot is not needed any more",
        ),
    ],
    ids=["stopping", "expected", "retiring", "failed-replacement", "scaled-away", "slot-served"],
)
def test_exits_that_restart_nothing(changes: dict[str, object], level: int, message: str) -> None:
    sup = Supervisor()
    verdict = sup.decide(facts(**changes))
    assert (verdict.action, verdict.level, verdict.message) == ("ignore", level, message)
    assert not verdict.drain_slot
    assert sup.streaks == {} and sup.boot_failures == 0  # none of them counts as a crash


def test_an_unexpected_exit_restarts_with_backoff() -> None:
    sup = Supervisor(RestartPolicy(backoff_base=0.5, stable_after=10))
    first = sup.decide(facts(uptime=1))
    second = sup.decide(facts(uptime=1))
    assert (first.action, first.delay, first.level) == ("restart", 0, logging.WARNING)
    assert first.message == (
        "worker 3 (pid 99) exited with code 1 unexpectedly; "
        "restarting slot 2 at once (crash 1 in a row)"
    )
    assert second.delay == 0.5
    assert second.message.endswith("restarting slot 2 in 0.5s (crash 2 in a row)")


def test_boot_failures_halt_the_cluster() -> None:
    sup = Supervisor(RestartPolicy(max_boot_failures=2))
    boot = facts(listened=False, uptime=0.1, returncode=-9)
    first = sup.decide(boot)
    assert first.action == "restart"
    assert "was killed by SIGKILL before it was listening; restarting" in first.message
    halt = sup.decide(boot)
    assert (halt.action, halt.level) == ("halt", logging.ERROR)
    assert halt.message == (
        "worker 3 (pid 99) was killed by SIGKILL before it was listening, and 2 workers in a "
        "row exited before listening: the application cannot start (see its error above); "
        "stopping the cluster"
    )


@pytest.mark.parametrize(
    ("changes", "drain"),
    [
        ({}, True),
        ({"expected": True}, True),  # scaled down: it was asked to leave
        ({"stopping": True}, False),  # the sockets close with the cluster
        ({"slot_taken": True}, False),  # a worker still holds the slot's sockets
        ({"size": 3}, False),  # the slot is still wanted
        ({"reuseport": False}, False),  # no slot has sockets of its own
    ],
)
def test_a_reuseport_slot_scaled_away_is_drained(changes: dict[str, object], drain: bool) -> None:
    verdict = Supervisor().decide(facts(**{"reuseport": True, "size": 1, **changes}))
    assert verdict.drain_slot is drain


def test_an_app_that_cannot_load_halts_at_once_with_status_2_until_the_cluster_served() -> None:
    cannot_load = facts(returncode=4, listened=False, uptime=0.2)
    verdict = Supervisor().decide(cannot_load)
    assert (verdict.action, verdict.status) == ("halt", 2)
    assert verdict.message == (
        "worker 3 (pid 99) exited with code 4: it cannot load the application; stopping the cluster"
    )
    # Once the cluster has served, the others keep serving: a boot failure like any.
    later = Supervisor().decide(dataclasses.replace(cannot_load, ready_once=True))
    assert (later.action, later.status) == ("restart", 1)
    # A replacement in a reload that cannot load: the old worker keeps serving.
    replacing = dataclasses.replace(cannot_load, replacing="worker 1 (pid 7)")
    assert Supervisor().decide(replacing).action == "ignore"
    # Status 4 from a worker that did listen is a crash like any other.
    assert Supervisor().decide(facts(returncode=4)).action == "restart"


# --- a healthy worker's death is no crash; a back-off never leaves nobody listening -------------


@pytest.mark.parametrize("sig", [-9, -15, -2, -1, -3])
def test_a_serving_worker_killed_from_outside_restarts_at_once_every_time(sig: int) -> None:
    sup = Supervisor(RestartPolicy(stable_after=10))
    verdicts = [sup.decide(facts(returncode=sig, uptime=0.3)) for _ in range(20)]
    assert {(v.action, v.delay) for v in verdicts} == {("restart", 0.0)}
    assert verdicts[0].message.endswith("at once (killed while serving: not a crash)")
    assert sup.streaks == {}  # no crash streak for either slot
    # A real crash afterwards is the slot's first.
    assert sup.decide(facts(uptime=0.3)).message.endswith("(crash 1 in a row)")


def test_a_kill_before_listening_is_still_a_boot_failure() -> None:
    sup = Supervisor(RestartPolicy(max_boot_failures=2))
    assert sup.decide(facts(returncode=-9, listened=False)).action == "restart"
    assert sup.decide(facts(returncode=-9, listened=False)).action == "halt"


@pytest.mark.parametrize("sig", [-11, -6, -7])
def test_a_worker_that_crashes_by_its_own_signal_backs_off(sig: int) -> None:
    sup = Supervisor(RestartPolicy(backoff_base=0.5, stable_after=10))
    sup.decide(facts(returncode=sig, uptime=1))
    assert sup.decide(facts(returncode=sig, uptime=1)).delay == 0.5


def test_a_worker_the_primary_killed_for_a_fault_counts_as_a_crash() -> None:
    sup = Supervisor(RestartPolicy(backoff_base=0.5, stable_after=10))
    sup.decide(facts(returncode=-9, uptime=1, faulted=True))
    assert sup.decide(facts(returncode=-9, uptime=1, faulted=True)).delay == 0.5


def test_no_backoff_when_no_other_worker_listens() -> None:
    sup = Supervisor(RestartPolicy(backoff_base=0.5, stable_after=10))
    for _ in range(5):
        sup.decide(facts(uptime=1))
    alone = sup.decide(facts(uptime=1, others_listening=0))
    assert (alone.action, alone.delay) == ("restart", 0.0)
    assert alone.message.endswith("at once (crash 6 in a row; no other worker listening)")
    # The streak still counts: with another worker listening the slot backs off again.
    assert sup.decide(facts(uptime=1, others_listening=1)).delay == 16.0


def test_boot_failures_still_halt_with_nobody_listening() -> None:
    sup = Supervisor(RestartPolicy(max_boot_failures=2))
    boot = facts(listened=False, uptime=0.1, others_listening=0)
    first = sup.decide(boot)
    assert (first.action, first.delay) == ("restart", 0.0)
    assert sup.decide(boot).action == "halt"
