"""Policy reuseport's rotation with real sockets on loopback: which socket the kernel picks."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator

import pytest

from aiocluster.primary.steering import Steering
from aiocluster.primary.steering_program import MAX_SLOTS, state_value

from .test_policies import needs_steering

pytestmark = [pytest.mark.timeout(30), needs_steering]


@pytest.fixture
def group() -> Iterator[list[socket.socket]]:
    """Three listening SO_REUSEPORT sockets on one loopback port: slots 1, 2, 3."""
    socks: list[socket.socket] = []
    port = 0
    try:
        for _ in range(3):
            sock = socket.socket()
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", port))
            port = sock.getsockname()[1]
            sock.listen(64)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def picks(socks: list[socket.socket], count: int) -> list[int]:
    """Connect ``count`` times, one after another; the slot (1-based) that got each."""
    port = socks[0].getsockname()[1]
    slots = []
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            ready, _, _ = select.select(socks, [], [], 5)
            assert len(ready) == 1
            conn, _ = ready[0].accept()
            conn.close()
            slots.append(socks.index(ready[0]) + 1)
    return slots


def steered(socks: list[socket.socket], serving: dict[int, int]) -> Steering:
    steering = Steering()
    for slot, sock in enumerate(socks, 1):
        steering.add(7, slot, sock)
    for slot, worker in serving.items():
        steering.join(worker, slot, 7)
    return steering


def test_the_serving_slots_take_turns(group: list[socket.socket]) -> None:
    steering = steered(group, {1: 11, 2: 12, 3: 13})
    assert steering.refused is None
    first = picks(group, 9)
    assert first[3:] == first[:-3] and sorted(first[:3]) == [1, 2, 3]
    steering.part(12)  # worker 12 left every listen: slot 2 serves no more
    assert sorted(picks(group, 6)) == [1, 1, 1, 3, 3, 3]
    steering.join(22, 2, 7)  # its replacement
    assert sorted(picks(group, 6)) == [1, 1, 2, 2, 3, 3]
    steering.close()


def test_a_slot_serves_while_any_of_its_workers_does(group: list[socket.socket]) -> None:
    steering = steered(group, {1: 11, 2: 12})
    steering.join(21, 1, 7)  # slot 1's successor starts before its predecessor drains
    steering.part(11, 7)
    assert sorted(picks(group, 4)) == [1, 1, 2, 2]
    steering.part(21, 99)  # another listen: nothing changes here
    assert sorted(picks(group, 4)) == [1, 1, 2, 2]
    steering.close()


def test_a_closed_slot_leaves_the_rotation(group: list[socket.socket]) -> None:
    steering = steered(group, {1: 11, 2: 12, 3: 13})
    steering.remove(7, 3)
    group[2].close()
    assert sorted(picks(group[:2], 4)) == [1, 1, 2, 2]
    steering.close()


def test_released_sockets_can_join_another_rotation(group: list[socket.socket]) -> None:
    """An in-place upgrade's new image builds its own maps around the same sockets."""
    old = steered(group, {1: 11, 2: 12, 3: 13})
    old.release()
    new = steered(group, {1: 11, 3: 13})
    assert new.refused is None
    assert sorted(picks(group, 4)) == [1, 1, 3, 3]
    new.close()
    old.close()


def test_with_no_slot_serving_the_kernels_hash_picks(group: list[socket.socket]) -> None:
    steering = steered(group, {})
    assert set(picks(group, 30)) == {1, 2, 3}  # one left out: odds 3 * (2/3)**30, ~1e-5
    steering.close()


def test_the_state_value_holds_the_count_and_the_order() -> None:
    value = state_value([0, 2])
    assert len(value) == 8 + 4 * MAX_SLOTS
    assert value[:16] == bytes([0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0])
    assert state_value(range(MAX_SLOTS + 5))[4:8] == MAX_SLOTS.to_bytes(4, "little")
