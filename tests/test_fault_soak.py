"""Fault soak (issue 15): every policy under mixed load while a seeded driver breaks things.

Keep-alive clients, a connection per request, and a websocket run throughout; the driver kills
workers (SIGKILL), stops one for 3 s (SIGSTOP), reloads, scales between 2 and 3 workers, and
starves a worker of descriptors (its open-files limit cut to just above what it holds) for 3 s.
Not run by default (marker ``faultsoak``): ``pytest -m faultsoak -s tests/test_fault_soak.py``.
``AIOCLUSTER_FAULT_SOAK_SECONDS`` is the length per policy (default 200: 10 minutes for the
three), ``AIOCLUSTER_FAULT_SOAK_SEED`` the sequence. The summary (requests served and failed,
the primary's descriptors and RSS at the start and the end) is printed.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import resource
import signal
import sys

import aiohttp
import pytest

from .actions import live_workers
from .conftest import StartCluster
from .harness import ClusterProcess, cli, pid_alive
from .load import KeepAliveLoad
from .test_fault_recovery import Probe

SECONDS = float(os.environ.get("AIOCLUSTER_FAULT_SOAK_SECONDS", "200"))
SEED = int(os.environ.get("AIOCLUSTER_FAULT_SOAK_SEED", "15"))
KEEPALIVE = 4
ACTIONS = ["kill", "kill", "stop", "reload", "scale", "fds"]

pytestmark = [pytest.mark.faultsoak, pytest.mark.timeout(SECONDS + 120)]


def primary_usage(pid: int) -> tuple[int, int]:
    """The primary's open descriptors and resident memory (KiB)."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return len(os.listdir(f"/proc/{pid}/fd")), rss


class Websocket:
    """One websocket, a message every 50 ms; reconnects when the server closes it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.echoed = 0
        self.reconnects = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as s:
            for _ in range(100_000):  # bounded: reconnects
                if self.stop.is_set():
                    return
                try:
                    async with s.ws_connect(self.url, timeout=aiohttp.ClientWSTimeout(5)) as ws:
                        while not self.stop.is_set():
                            await ws.send_str("x")
                            async with asyncio.timeout(5):
                                msg = await ws.receive()
                            if msg.type != aiohttp.WSMsgType.TEXT:
                                break
                            self.echoed += 1
                            await asyncio.sleep(0.05)  # pacing of the load itself
                except (aiohttp.ClientError, TimeoutError, ConnectionError):
                    pass
                self.reconnects += 1


async def act(c: ClusterProcess, action: str, rng: random.Random, size: int) -> int:
    """Do ``action``, wait until the cluster has recovered from it; the cluster's size after."""
    mark = len(c.lines)
    live = sorted(live_workers(c))
    victim = rng.choice(live)
    pid = c.worker_pids[victim]
    if action == "kill":
        os.kill(pid, signal.SIGKILL)
        await c.wait_for(rf"worker {victim} \(pid \d+\) was killed by SIGKILL", start=mark)
        m = await c.wait_for(r"started worker (\d+) ", start=mark)
        await c.wait_for(rf"worker {m.group(1)} \(pid \d+\) listening on", start=mark)
    elif action == "stop":
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(3)  # the fault itself lasts 3 s
        os.kill(pid, signal.SIGCONT)
    elif action == "reload":
        c.signal(signal.SIGHUP)
        await c.wait_for(r"reload complete: \d+ workers replaced", start=mark, timeout=60)
        for old in live:  # drained and gone before the next action picks a victim
            await c.wait_for(rf"worker {old} \(pid \d+\) (exited|was killed)", start=mark)
    elif action == "scale":
        size = 2 if size == 3 else 3
        proc = await asyncio.create_subprocess_exec(
            *cli("scale", str(size)), env=c.env, stdout=asyncio.subprocess.DEVNULL
        )
        assert await proc.wait() == 0
        await c.wait_for(rf"scaling from \d to {size} workers", start=mark)
        if size == 3:
            m = await c.wait_for(r"started worker (\d+) ", start=mark)
            await c.wait_for(rf"worker {m.group(1)} \(pid \d+\) listening on", start=mark)
        else:  # the drained worker is gone before the next action picks a victim
            m = await c.wait_for(r"scaling down: draining worker (\d+) ", start=mark)
            await c.wait_for(rf"worker {m.group(1)} \(pid \d+\) (exited|was killed)", start=mark)
    else:  # fds
        try:
            _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            held = len(os.listdir(f"/proc/{pid}/fd"))
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (held + 4, hard))
            await asyncio.sleep(3)  # the fault itself lasts 3 s
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
        except (ProcessLookupError, FileNotFoundError):
            pass  # it was recycled meanwhile
    return size


@pytest.mark.parametrize("policy", ["shared", "rr", "reuseport"])
async def test_fault_soak(start_cluster: StartCluster, policy: str) -> None:
    c = await start_cluster(
        *cli(
            "run", "webapp:app", "-w", "3", "-b", "127.0.0.1:0", "--policy", policy,
            "--graceful-timeout", "10", "--timeout", "20",
        )
    )  # fmt: skip
    assert c.proc is not None
    primary = c.proc.pid
    start_fds, start_rss = primary_usage(primary)
    loop = asyncio.get_running_loop()
    rng = random.Random(SEED)
    done: collections.Counter[str] = collections.Counter()
    size = 3
    ws = Websocket(f"{c.url}/ws")
    keepalive = KeepAliveLoad(
        f"{c.url}/", concurrency=KEEPALIVE, max_requests=10**8, max_seconds=SECONDS + 60
    )
    async with keepalive, Probe(f"{c.url}/") as probe:
        ws_task = asyncio.create_task(ws.run())
        await keepalive.wait_requests(100)
        deadline = loop.time() + SECONDS
        while loop.time() < deadline:
            action = rng.choice(ACTIONS)
            size = await act(c, action, rng, size)
            done[action] += 1
            await keepalive.wait_requests(50)  # serving again before the next fault
        ws.stop.set()
        await ws_task
    end_fds, end_rss = primary_usage(primary)
    failed = keepalive.result.failed + len(probe.failed)
    served = keepalive.result.ok + probe.ok + ws.echoed
    report = (
        f"fault soak {policy} ({SECONDS:g}s, seed {SEED}): {served} served "
        f"({keepalive.result.ok} keep-alive, {probe.ok} one-per-connection, {ws.echoed} ws "
        f"echoes, {ws.reconnects} ws reconnects), {failed} failed; actions {dict(done)}; "
        f"primary fds {start_fds} -> {end_fds}, RSS {start_rss} -> {end_rss} KiB"
    )
    print(report, file=sys.stderr)
    faults = done["kill"] + done["stop"] + done["fds"]
    # A kill costs at most each client's request in flight; nothing else may fail a request.
    assert failed <= done["kill"] * (KEEPALIVE + 1) + faults, (
        report,
        keepalive.result.errors[:5],
        probe.failed[:5],
    )
    assert "Traceback" not in c.output, f"{report}\n{c.tracebacks()}"
    pids = set(c.worker_pids.values())
    assert await c.stop(timeout=40) == 0
    assert not [p for p in pids if pid_alive(p)], report
    leftovers = [f for _, _, files in os.walk(c.runtime_dir) for f in files]
    assert leftovers == [], report
    assert end_fds <= start_fds + 8, report
