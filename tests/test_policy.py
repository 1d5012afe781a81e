"""The scheduling choice alone (pure code, no processes): rotation, least-conn, sticky hashing."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import pytest

from aiocluster import ClusterConfig, ConfigError
from aiocluster._config import reuseport_problem
from aiocluster.primary.scheduling import Scheduler, sticky_order


@dataclass
class W:
    id: int
    slot: int
    load: int = 0
    has_room: bool = True


def picks(scheduler: Scheduler, workers: list[W], n: int, client: str | None = None) -> list[int]:
    out = []
    for _ in range(n):
        chosen = scheduler.choose(workers, client)
        assert chosen is not None
        out.append(chosen.id)
    return out


def test_round_robin_rotates_in_slot_order() -> None:
    workers = [W(3, 3), W(1, 1), W(2, 2)]
    assert picks(Scheduler(), workers, 7) == [1, 2, 3, 1, 2, 3, 1]


def test_round_robin_skips_a_full_worker_and_keeps_its_turn_order() -> None:
    workers = [W(1, 1), W(2, 2), W(3, 3)]
    s = Scheduler()
    assert picks(s, workers, 1) == [1]
    workers[1].has_room = False
    assert picks(s, workers, 3) == [3, 1, 3]
    workers[1].has_room = True
    assert picks(s, workers, 3) == [1, 2, 3]


def test_round_robin_continues_after_a_worker_leaves_and_a_replacement_joins() -> None:
    s = Scheduler()
    assert picks(s, [W(1, 1), W(2, 2), W(3, 3)], 2) == [1, 2]
    # worker 2 died: rotation goes on from its place, not from the start
    assert picks(s, [W(1, 1), W(3, 3)], 2) == [3, 1]
    # its replacement (id 4) takes slot 2 and its turn
    assert picks(s, [W(1, 1), W(4, 2), W(3, 3)], 3) == [4, 3, 1]


def test_no_room_anywhere_means_wait() -> None:
    assert Scheduler().choose([W(1, 1, has_room=False)]) is None
    assert Scheduler().choose([]) is None
    assert Scheduler("least-conn").choose([W(1, 1, has_room=False)]) is None


def test_least_conn_takes_the_lowest_load_and_rotates_ties() -> None:
    s = Scheduler("least-conn")
    workers = [W(1, 1, load=5), W(2, 2, load=1), W(3, 3, load=1)]
    assert picks(s, workers, 1) == [2]
    assert picks(s, workers, 1) == [3]  # a tie: the rotation decides, not the slot number
    assert picks(s, workers, 1) == [2]
    workers[1].has_room = False
    workers[2].load = 9
    assert picks(s, workers, 1) == [1]


def test_sticky_keeps_a_client_on_one_worker() -> None:
    s = Scheduler(sticky=True)
    workers = [W(1, 1), W(2, 2), W(3, 3)]
    for client in (f"10.0.0.{i}" for i in range(1, 30)):
        expected = sticky_order(client, [1, 2, 3])[0]
        assert set(picks(s, workers, 4, client)) == {expected}


def test_sticky_spreads_clients_over_workers() -> None:
    counts = collections.Counter(
        sticky_order(f"10.0.{i // 250}.{i % 250}", range(1, 5))[0] for i in range(4000)
    )
    assert set(counts) == {1, 2, 3, 4}
    assert min(counts.values()) > 800  # 1000 each on average


def test_sticky_moves_only_the_dead_slots_clients_and_brings_them_back() -> None:
    clients = [f"192.168.1.{i}" for i in range(1, 200)]
    before = {c: sticky_order(c, [1, 2, 3, 4])[0] for c in clients}
    during = {c: sticky_order(c, [1, 2, 4])[0] for c in clients}  # slot 3 is dead
    for c in clients:
        if before[c] == 3:
            assert during[c] == sticky_order(c, [1, 2, 3, 4])[1]
        else:
            assert during[c] == before[c]
    after = {c: sticky_order(c, [1, 2, 3, 4])[0] for c in clients}  # slot 3 replaced
    assert after == before
    assert any(slot == 3 for slot in before.values())


def test_sticky_waits_for_its_worker_and_prefers_the_newest_in_a_slot() -> None:
    s = Scheduler(sticky=True)
    client = "127.0.0.7"
    slot = sticky_order(client, [1, 2])[0]
    full = [W(1, 1), W(2, 2)]
    full[slot - 1].has_room = False
    assert s.choose(full, client) is None  # no silent move while the worker lives
    overlap = [W(1, 1), W(2, 2), W(9, slot)]
    chosen = s.choose(overlap, client)
    assert chosen is not None and chosen.id == 9


def test_sticky_without_an_address_falls_back_to_the_balance() -> None:
    s = Scheduler(sticky=True)
    assert picks(s, [W(1, 1), W(2, 2)], 3, None) == [1, 2, 1]


def test_unknown_balance_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown balance"):
        Scheduler("random")  # type: ignore[arg-type]


def test_reuseport_needs_linux() -> None:
    assert reuseport_problem("linux") is None
    problem = reuseport_problem("darwin")
    assert problem is not None and "only Linux" in problem
    assert reuseport_problem("freebsd14") is not None
    assert reuseport_problem("linux", has_option=False) == (
        "this system has no SO_REUSEPORT socket option"
    )


def test_config_policy_default_env_and_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOCLUSTER_POLICY", raising=False)
    assert ClusterConfig.build(workers=1).policy == "shared"
    monkeypatch.setenv("AIOCLUSTER_POLICY", "rr")
    assert ClusterConfig.build(workers=1).policy == "rr"
    assert ClusterConfig.build(workers=1, policy="reuseport").policy == "reuseport"
    config = ClusterConfig.build(workers=1, policy="rr", balance="least-conn")
    assert (config.balance, config.sticky) == ("least-conn", False)
    assert ClusterConfig.build(workers=1, policy="rr", sticky=True).sticky


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"policy": "roundrobin"}, "policy='roundrobin': must be one of shared, rr, reuseport"),
        (
            {"policy": "rr", "balance": "random"},
            "balance='random': must be one of round-robin, least-conn",
        ),
        ({"policy": "shared", "sticky": True}, "sticky needs policy 'rr'"),
        ({"policy": "reuseport", "balance": "least-conn"}, "needs policy 'rr'"),
        ({"policy": "rr", "balance": "least-conn", "sticky": True}, "cannot be combined"),
    ],
)
def test_config_rejects_policy_options_clearly(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ClusterConfig.build(workers=1, **options)


def test_config_names_the_environment_when_it_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOCLUSTER_POLICY", "fast")
    with pytest.raises(ConfigError, match=r"AIOCLUSTER_POLICY='fast': must be one of shared, rr"):
        ClusterConfig.build(workers=1)
