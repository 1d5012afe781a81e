"""Things tests do to a running cluster, each waiting for the log line that says it is done."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp

from .harness import ClusterProcess

#: The cluster of tests/apps/hostile.py: workers that misbehave on request.
HOSTILE = (sys.executable, "hostile.py")


async def open_gate(c: ClusterProcess, gate: Path) -> None:
    """Let workers waiting on the FIFO ``gate`` (``webapp.wait_for_gate``) go on, and wait
    until the cluster is ready.

    O_RDWR never blocks on a FIFO; the byte stays unread, so every worker sees it.
    """
    writer = os.open(gate, os.O_RDWR)
    try:
        os.write(writer, b"!")
        await c.ready()
    finally:
        os.close(writer)


async def get_ok(url: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
        s.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r,
    ):
        assert r.status == 200, await r.text()
        data = await r.json()
        assert isinstance(data, dict)
        return data


async def inject(c: ClusterProcess, kind: str) -> int:
    """Ask one worker to misbehave; return its id once it has."""
    mark = len(c.lines)
    # One raw request: an HTTP client might retry it on another worker once this one is killed.
    _, writer = await asyncio.open_connection("127.0.0.1", c.port)
    try:
        writer.write(f"GET /inject?kind={kind} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        m = await c.wait_for(rf"TEST inject kind={re.escape(kind)} worker=(\d+)", start=mark)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return int(m.group(1))


async def expect_cut_off(c: ClusterProcess, worker: int, what: str, why: str) -> None:
    """``worker`` was killed for ``why`` and a new worker listens in its place."""
    await c.wait_for(rf"worker {worker} \(pid \d+\) {what} \(.*{re.escape(why)}.*\); killing it")
    mark = len(c.lines)
    await c.wait_for(rf"worker {worker} \(pid \d+\) was killed by SIGKILL unexpectedly; restarting")
    m = await c.wait_for(r"started worker (\d+) ", start=mark)
    await c.wait_for(rf"worker {m.group(1)} \(pid \d+\) listening on", start=mark)


def live_workers(c: ClusterProcess) -> dict[int, int]:
    """Workers started and not yet reported dead: id -> pid."""
    dead = {
        int(m.group(1))
        for line in c.lines
        if (m := re.search(r"worker (\d+) \(pid \d+\) (was killed|exited)", line))
    }
    return {wid: pid for wid, pid in c.worker_pids.items() if wid not in dead}


async def kill_and_wait(c: ClusterProcess, wid: int) -> None:
    mark = len(c.lines)
    os.kill(c.worker_pids[wid], signal.SIGKILL)
    await c.wait_for(rf"worker {wid} \(pid \d+\) was killed by SIGKILL unexpectedly", start=mark)
    m = await c.wait_for(r"started worker (\d+) ", start=mark)
    await c.wait_for(rf"worker {m.group(1)} \(pid \d+\) listening on", start=mark)


async def reload_and_wait(c: ClusterProcess, workers: int) -> None:
    mark = len(c.lines)
    old = set(live_workers(c))
    c.signal(signal.SIGHUP)
    await c.wait_for(rf"reload complete: {workers} workers replaced", start=mark)
    for wid in old:
        await c.wait_for(rf"worker {wid} \(pid \d+\) exited with code 0", start=mark)
