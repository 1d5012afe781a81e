"""Soak: mixed keep-alive load on 3 workers for about 45 s while a seeded driver kills and reloads.

Fast requests back to back and 200 ms requests side by side. Every request either succeeds or
was in flight on a worker that was killed: each kill may cost at most one request per client
connection, and a reload none. ``AIOCLUSTER_SOAK_SECONDS`` and
``AIOCLUSTER_SOAK_SEED`` change the length and the sequence; the summary is printed (``-s``).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from dataclasses import dataclass, field

import pytest

from .actions import live_workers
from .conftest import StartCluster
from .harness import cli
from .load import KeepAliveLoad

SECONDS = float(os.environ.get("AIOCLUSTER_SOAK_SECONDS", "45"))
SEED = int(os.environ.get("AIOCLUSTER_SOAK_SEED", "20240601"))
FAST, SLOW = 4, 2  # clients of each kind
CONCURRENCY = FAST + SLOW
WORKERS = 3
# The supervisor restarts at once a worker that lived this long; killing younger ones would only
# measure its crash backoff.
STABLE = 10.5

pytestmark = [pytest.mark.soak, pytest.mark.timeout(SECONDS + 90)]


@dataclass
class Window:
    """What happened to the load from one action's start to the next one's."""

    action: str
    failed: int = 0
    answered: int = 0


@dataclass
class Summary:
    windows: list[Window] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(1 for w in self.windows if w.action == action)

    def failed(self, action: str) -> int:
        return sum(w.failed for w in self.windows if w.action == action)


async def test_soak_kills_and_reloads_under_keepalive_load(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        *cli(
            "run", "webapp:app", "-w", str(WORKERS), "-b", "127.0.0.1:0", "--graceful-timeout", "10"
        )
    )
    loop = asyncio.get_running_loop()
    rng = random.Random(SEED)
    born = dict.fromkeys(live_workers(c), loop.time())
    summary = Summary([Window("start")])
    fast = KeepAliveLoad(
        f"{c.url}/", concurrency=FAST, max_requests=10**8, max_seconds=SECONDS + 60
    )
    slow = KeepAliveLoad(
        f"{c.url}/slow?s=0.2", concurrency=SLOW, max_requests=10**8, max_seconds=SECONDS + 60
    )
    load = Loads(fast, slow)
    async with fast, slow:
        await fast.wait_requests(200)
        await slow.wait_requests(4)
        deadline = loop.time() + SECONDS
        while loop.time() < deadline:
            # A reload first: the workers are too young to kill (see STABLE) anyway.
            action = (
                rng.choice(["kill", "kill", "reload"]) if len(summary.windows) > 1 else "reload"
            )
            if action == "kill":
                oldest = min(born.values())
                if loop.time() - oldest < STABLE:
                    # Pacing, not a wait for an event: the load runs meanwhile.
                    await asyncio.sleep(oldest + STABLE - loop.time() + 0.05)
            close_window(summary, load)
            summary.windows.append(Window(action))
            mark = len(c.lines)
            if action == "kill":
                now = loop.time()
                victim = rng.choice(sorted(w for w, t in born.items() if now - t >= STABLE))
                os.kill(c.worker_pids[victim], signal.SIGKILL)
                await c.wait_for(rf"worker {victim} \(pid \d+\) was killed by SIGKILL", start=mark)
                m = await c.wait_for(r"started worker (\d+) ", start=mark)
                await c.wait_for(rf"worker {m.group(1)} \(pid \d+\) listening on", start=mark)
                del born[victim]
                born[int(m.group(1))] = loop.time()
            else:
                c.signal(signal.SIGHUP)
                await c.wait_for(f"reload complete: {WORKERS} workers replaced", start=mark)
                for old in list(born):
                    await c.wait_for(rf"worker {old} \(pid \d+\) exited with code 0", start=mark)
                born = dict.fromkeys(live_workers(c), loop.time())
            # The cluster serves again before the next action.
            await fast.wait_requests(100)
            await slow.wait_requests(2)
        close_window(summary, load)
    result = load
    kills, reloads = summary.count("kill"), summary.count("reload")
    report = (
        f"soak ({SECONDS:g}s, seed {SEED}): {result.ok} ok, {result.failed} failed; "
        f"{kills} kills ({summary.failed('kill')} failed), "
        f"{reloads} reloads ({summary.failed('reload')} failed), "
        f"{len(result.workers)} workers served"
    )
    print(report)
    assert sum(w.failed for w in summary.windows) == result.failed
    assert kills >= 1 and reloads >= 1, report
    assert summary.failed("start") == 0, result.errors[:5]
    assert summary.failed("reload") == 0, (report, result.errors[:5])
    for window in summary.windows:
        if window.action == "kill":
            assert window.failed <= CONCURRENCY, (report, result.errors[:5])
    assert result.failed <= kills * CONCURRENCY, report
    assert fast.result.ok > 1000 and slow.result.ok > 50, report
    assert "Traceback" not in c.output
    assert await c.stop() == 0


@dataclass
class Loads:
    """Both loads' results, added up."""

    fast: KeepAliveLoad
    slow: KeepAliveLoad

    @property
    def ok(self) -> int:
        return self.fast.result.ok + self.slow.result.ok

    @property
    def failed(self) -> int:
        return self.fast.result.failed + self.slow.result.failed

    @property
    def errors(self) -> list[str]:
        return self.fast.result.errors + self.slow.result.errors

    @property
    def workers(self) -> set[int]:
        return set(self.fast.result.workers) | set(self.slow.result.workers)


def close_window(summary: Summary, load: Loads) -> None:
    """Attribute the load's progress since the previous window to it."""
    window = summary.windows[-1]
    window.failed = load.failed - sum(w.failed for w in summary.windows[:-1])
    window.answered = load.ok + load.failed - sum(w.answered for w in summary.windows[:-1])
