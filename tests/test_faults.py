"""Faults in a real cluster: a stopped worker, workers that stop reading their channel.

In each, the cluster keeps serving through the healthy workers, cuts off the faulty one, replaces
it, and reports it in the log. (The primary's SIGKILL is in test_cluster.py.)
"""

from __future__ import annotations

import os
import resource
import signal

import pytest

from .actions import HOSTILE, expect_cut_off, get_ok, inject
from .conftest import StartCluster
from .harness import cli
from .procfs import fd_kinds, fd_targets

pytestmark = pytest.mark.timeout(40)


async def test_a_stopped_worker_is_killed_and_replaced_while_the_other_serves(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "--timeout", "2")
    )
    stopped = c.worker_pids[1]
    os.kill(stopped, signal.SIGSTOP)
    # Until the hang detector acts, every new connection is accepted by worker 2 alone.
    answers = [await get_ok(f"{c.url}/") for _ in range(20)]
    assert {a["worker"] for a in answers} == {2}
    await c.wait_for(r"worker 1 \(pid \d+\) is hung: no heartbeat from its event loop for 2s")
    # SIGUSR1 stays pending in a stopped process, so there is no stack dump; SIGKILL still ends
    # it (a stopped process needs no SIGCONT to die).
    await c.wait_for(r"worker 1 \(pid \d+\) was killed by SIGKILL unexpectedly; restarting slot 1")
    await c.wait_for(r"worker 3 \(pid \d+\) listening on")
    assert "Current thread" not in c.output  # faulthandler never ran
    assert c.count("is hung") == 1  # the healthy worker was never suspected
    await get_ok(f"{c.url}/")


async def test_a_worker_that_stops_reading_is_cut_off_not_buffered_for(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(*HOSTILE)
    assert c.proc is not None
    baseline = fd_kinds(c.proc.pid)
    worker = await inject(c, "stop-reading-and-flood")
    m = await c.wait_for(r"TEST flood sent=(\d+) of 320")
    # 8 MiB of 64 KiB messages fit (plus what the kernel buffers), 20 MiB never do.
    assert 100 < int(m.group(1)) < 320
    await expect_cut_off(c, worker, "stopped reading its channel", "peer is not reading")
    await get_ok(f"{c.url}/")
    assert fd_kinds(c.proc.pid) == baseline


async def test_queryserver_replies_never_read_are_bounded(start_cluster: StartCluster) -> None:
    c = await start_cluster(*HOSTILE)
    assert c.proc is not None
    baseline = fd_kinds(c.proc.pid)
    worker = await inject(c, "query-many-without-reading")
    # Each reply carries a socket: past 256 queued duplicates the worker is cut off.
    await expect_cut_off(c, worker, "stopped reading its channel", "257 descriptors queued")
    await get_ok(f"{c.url}/")
    assert fd_kinds(c.proc.pid) == baseline


async def test_one_queryserver_reply_never_read_does_not_hurt(start_cluster: StartCluster) -> None:
    c = await start_cluster(*HOSTILE)
    assert c.proc is not None
    baseline = fd_kinds(c.proc.pid)
    worker = await inject(c, "query-once-without-reading")
    await c.wait_for(rf"TEST primary got {{'after': 'queryServer'}} from worker={worker}")
    # The reply (and its descriptor) waits in the worker's socket, not in the primary.
    assert fd_kinds(c.proc.pid) == baseline
    answers = [await get_ok(f"{c.url}/") for _ in range(4)]
    assert answers
    assert "killing it" not in c.output
    # The worker can no longer hear the primary, so a stop must kill it after the grace period;
    # kill it now and check that its replacement leaves the primary as it was.
    mark = len(c.lines)
    os.kill(c.worker_pids[worker], signal.SIGKILL)
    await c.wait_for(r"was killed by SIGKILL unexpectedly; restarting", start=mark)
    await c.wait_for(r"started worker 3 ", start=mark)
    await c.wait_for(r"worker 3 \(pid \d+\) listening on", start=mark)
    assert fd_kinds(c.proc.pid) == baseline


async def test_rr_primary_out_of_descriptors_backs_off_and_serves_everyone(
    start_cluster: StartCluster,
) -> None:
    """The primary's accept loop meets a real EMFILE (its open-files limit lowered from outside,
    with prlimit): it pauses accepting, the connections wait in the kernel's backlog, and every
    one of them is answered once descriptors free up."""
    from .test_policies import answer_raw, send_raw

    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "--policy", "rr")
    )
    assert c.proc is not None
    primary = c.proc.pid
    soft, hard = resource.prlimit(primary, resource.RLIMIT_NOFILE)
    # Room for one accepted connection, not for the duplicate its hand-off needs as well.
    resource.prlimit(primary, resource.RLIMIT_NOFILE, (max(fd_targets(primary)) + 2, hard))
    try:
        clients = [await send_raw(c.port) for _ in range(20)]
        await c.wait_for(r"cannot take connections on .*Too many open files; pausing accepts")
    finally:
        resource.prlimit(primary, resource.RLIMIT_NOFILE, (soft, hard))
    answers = [await answer_raw(client) for client in clients]
    assert {a["worker"] for a in answers} <= {1, 2}
    assert len(answers) == 20
    assert c.proc.returncode is None
    assert await c.stop() == 0
