"""Descriptor hygiene, counted in /proc: nothing leaks in the primary or the workers.

Across worker deaths, reloads, protocol errors and listens that come and go, the primary ends up
holding the descriptors it started with; every worker holds only its stdio, its event loop's
own descriptors, its channel and the listening sockets, all close-on-exec.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from .actions import (
    HOSTILE,
    expect_cut_off,
    get_ok,
    inject,
    kill_and_wait,
    live_workers,
    reload_and_wait,
)
from .conftest import StartCluster
from .harness import ClusterProcess, cli
from .procfs import O_CLOEXEC, fd_flags, fd_kinds, fd_targets, listening_tcp_inode, sockets

pytestmark = pytest.mark.timeout(60)

# The event loop's own sockets: asyncio's self-pipe, or uvloop's signal wakeup pair.
LOOP_SOCKETS = 2


async def test_the_primary_holds_the_same_descriptors_after_many_cycles(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(*HOSTILE)
    assert c.proc is not None
    primary = c.proc.pid
    # The zygote forked at start is watched through a pidfd; the first reload replaces it with
    # a spawned one (the loop's child watcher). From then on nothing may change.
    await reload_and_wait(c, 2)
    baseline = fd_kinds(primary)
    for rounds in range(1, 3):
        await kill_and_wait(c, min(live_workers(c)))
        await reload_and_wait(c, 2)
        worker = await inject(c, "fd-of-socket")
        await expect_cut_off(c, worker, "broke the channel protocol", "descriptors")
        # 20 listens on new ports, each closed again: the primary closes each handle.
        await get_ok(f"{c.url}/listen-cycle?how=site&n=20")
        await c.wait_count(
            r"closed 127\.0\.0\.1:\d+: no worker listens on it any more", 20 * rounds
        )
        assert fd_kinds(primary) == baseline
    assert fd_kinds(primary) == baseline
    assert "Traceback" not in c.output


async def test_servers_that_never_report_closing_are_released_with_their_worker(
    start_cluster: StartCluster,
) -> None:
    """``create_server`` servers cannot tell the primary they closed (asyncio.Server has no
    close hook), so their sockets stay in the primary until the worker exits."""
    c = await start_cluster(*HOSTILE)
    assert c.proc is not None
    primary = c.proc.pid
    baseline = fd_kinds(primary)
    data = await get_ok(f"{c.url}/listen-cycle?how=server&n=10")
    # The ten listening sockets are held (a descriptor duplicated for a send may be in flight).
    assert fd_kinds(primary)["socket"] >= baseline["socket"] + 10
    await kill_and_wait(c, int(str(data["worker"])))
    assert fd_kinds(primary) == baseline


def worker_report(c: ClusterProcess) -> dict[int, set[int]]:
    """Each live worker's socket inodes, after checking that all its descriptors are in order."""
    found = {}
    for wid, pid in live_workers(c).items():
        for fd, target in fd_targets(pid).items():
            if fd > 2:
                assert fd_flags(pid, fd) & O_CLOEXEC, (
                    f"worker {wid}: fd {fd} ({target}) inheritable"
                )
                # Only the loop's internals, sockets, and libuv's reserve fd on /dev/null.
                assert re.fullmatch(r"(socket|pipe|anon_inode):\[?.*|/dev/null", target), target
        found[wid] = sockets(pid)
    return found


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_workers_hold_only_what_they_need(start_cluster: StartCluster, loop: str) -> None:
    extra = ["--no-uvloop"] if loop == "asyncio" else []
    c = await start_cluster(*cli("run", "webapp:app", "-w", "3", "-b", "127.0.0.1:0", *extra))
    assert c.proc is not None
    listener = listening_tcp_inode(c.port)
    primary = sockets(c.proc.pid)
    # The primary: its loop's pair, the listening socket, the control socket, the zygote's
    # channel, one channel end per worker.
    assert len(primary) == LOOP_SOCKETS + 1 + 1 + 1 + 3
    workers = worker_report(c)
    for wid, socks in workers.items():
        # Its loop's pair, its channel end, the listening socket: no other worker's channel,
        # no channel end of the primary's.
        assert len(socks) == LOOP_SOCKETS + 2, (wid, socks)
        assert socks & primary == {listener}
        for other, other_socks in workers.items():
            if other != wid:
                assert socks & other_socks == {listener}
    # A long-lived worker holds the same after others die and are replaced.
    keep = max(workers)
    before = fd_kinds(c.worker_pids[keep])
    primary_before = fd_kinds(c.proc.pid)
    for wid in sorted(workers):
        if wid != keep:
            await kill_and_wait(c, wid)
    assert fd_kinds(c.worker_pids[keep]) == before
    worker_report(c)  # the replacements are as clean
    assert fd_kinds(c.proc.pid) == primary_before


CHILD = """
import json, os
import aiocluster.worker.link
names = os.listdir("/proc/self/fd")
print(json.dumps([int(n) for n in names if os.path.exists(f"/proc/self/fd/{n}")]))
"""


def test_a_worker_closes_what_it_inherited_by_mistake() -> None:
    """What uvloop's spawn (no close_fds) would leave in a worker is closed at import."""
    channel, child = socket.socketpair()
    kept = child.fileno()
    stray_r, stray_w = os.pipe()
    os.set_inheritable(stray_r, True)
    try:
        env = {
            **os.environ,
            "AIOCLUSTER_WORKER_ID": "7",
            "AIOCLUSTER_CHANNEL_FD": str(child.fileno()),
        }
        out = subprocess.run(
            [sys.executable, "-c", CHILD],
            env=env,
            pass_fds=(child.fileno(), stray_r),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    finally:
        for fd in (stray_r, stray_w):
            os.close(fd)
        channel.close()
        child.close()
    assert set(json.loads(out)) == {0, 1, 2, kept}, out


async def test_descriptors_received_by_a_worker_are_close_on_exec(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0"))
    listener = listening_tcp_inode(c.port)
    (pid,) = live_workers(c).values()
    (fd,) = [fd for fd, t in fd_targets(pid).items() if t == f"socket:[{listener}]"]
    assert fd_flags(pid, fd) & O_CLOEXEC
