"""The upgrade state document (pure): dump/load round trip, and every kind of refusal."""

from __future__ import annotations

import dataclasses
import json

import pytest

from aiocluster._config import ClusterConfig
from aiocluster.primary.upgrade_state import (
    VERSION,
    BadState,
    ChannelRecord,
    HandleRecord,
    UpgradeState,
    WorkerRecord,
    dump,
    load,
    load_config,
    render_config,
)
from aiocluster.wire.address import Address


def a_state() -> UpgradeState:
    config = ClusterConfig.build(workers=2, bind=["127.0.0.1:0", "unix:/tmp/x.sock"])
    tcp = Address.tcp("127.0.0.1", 0)
    return UpgradeState(
        written_by="0.1.0",
        upgrades=1,
        argv=("/usr/bin/python3", "-m", "aiocluster", "run", "app:app"),
        config=render_config(config),
        started=1700000000.5,
        size=2,
        next_worker_id=3,
        reloads=0,
        binds=config.binds,
        handles=(HandleRecord(tcp, 0, 0, 7, 1, None, (1, 2)),),
        listen_ids=((tcp, 0, 1),),
        pinned=((tcp, 0),),
        workers=(
            WorkerRecord(1, 1, 100, ChannelRecord(8, 4), 1.5, ("127.0.0.1:8000",), {"rss": 1.0}),
            WorkerRecord(2, 2, 101, ChannelRecord(9, 4), 1.5, groups=(1,)),
        ),
        start_method="fork",
        zygote_pid=99,
        zygote_channel=ChannelRecord(10, 2),
        streaks={1: 2},
        restarts={1: 3},
        retired={1: {"requests": 5, "accepted": 2}},
        accepted={1: 4},
        control_fd=11,
        control_path="/run/x.sock",
        control_inode=1234,
        reply_fd=12,
    )


def test_round_trip_and_the_descriptors_handed_over() -> None:
    state = a_state()
    assert load(dump(state)) == state
    assert sorted(state.fds()) == [7, 8, 9, 10, 11, 12]


def test_the_configuration_round_trips_through_the_option_table() -> None:
    config = ClusterConfig.build(workers=3, admin="127.0.0.1:9100", policy="rr")
    loaded, unknown = load_config(render_config(config))
    assert loaded == config and unknown == []
    rendered = {**render_config(config), "gone_option": 1}
    del rendered["backlog"]  # an option the old code did not have: its default
    loaded, unknown = load_config(rendered)
    assert unknown == ["gone_option"] and loaded.backlog == config.backlog


def test_a_bad_configuration_value_is_refused() -> None:
    rendered = {**render_config(ClusterConfig.build()), "workers": 0}
    with pytest.raises(BadState, match="configuration in the upgrade state"):
        load_config(rendered)


def doc() -> dict[str, object]:
    parsed: dict[str, object] = json.loads(dump(a_state()))
    return parsed


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"version": VERSION + 1}, "newer than this code's"),
        ({"version": 0}, "older than this code's"),
        ({"version": "1"}, "no valid version"),
        ({"format": "something-else"}, "not an aiocluster upgrade state"),
        ({"size": 0}, "expected an integer >= 1"),
        ({"workers": [{"id": 1}]}, r"field '\w+' is missing"),
        ({"handles": [{"fd": 1}]}, "unknown address kind|must be an object"),
        ({"control_fd": 2}, "descriptor 2 cannot be handed over"),
        ({"served": 1}, "field 'served' must be bool"),
        ({"upgrades": True}, "must be int, not bool"),
        ({"start_method": "forkserver"}, "expected one of fork, spawn"),
        ({"started": -1}, "expected a number >= 0"),
    ],
)
def test_bad_documents_are_refused_with_one_line(change: dict[str, object], error: str) -> None:
    with pytest.raises(BadState, match=error) as caught:
        load(json.dumps({**doc(), **change}).encode())
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("data", [b"", b"not json", b"[]", b'{"format": 1}', b"\xff"])
def test_not_a_state_at_all(data: bytes) -> None:
    with pytest.raises(BadState):
        load(data)


def test_every_field_survives_a_dump() -> None:
    state = a_state()
    for f in dataclasses.fields(state):
        assert getattr(load(dump(state)), f.name) == getattr(state, f.name), f.name
