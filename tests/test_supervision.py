"""Supervision with real processes: crashes, hangs, recycling, rolling reloads, scaling."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
from pathlib import Path

import aiohttp
import pytest

from aiocluster.primary.priority import YIELD_NICE, can_restore

from .conftest import StartCluster
from .harness import cli, pid_alive
from .load import KeepAliveLoad, reload_twice_under

pytestmark = pytest.mark.timeout(90)

VERSIONED_APP = """
import os
import aiocluster
from aiohttp import web

VERSION = {version!r}
{broken}

async def whoami(request):
    return web.json_response({{"worker": aiocluster.worker_id(), "pid": os.getpid(),
                               "version": VERSION}})

app = web.Application()
app.router.add_get("/", whoami)
"""


def write_app(folder: Path, version: str, *, broken: bool = False) -> None:
    failure = 'raise RuntimeError("version " + VERSION + " is broken")' if broken else ""
    (folder / "versioned.py").write_text(VERSIONED_APP.format(version=version, broken=failure))


async def version_of(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        data = await r.json()
        return str(data["version"])


async def test_a_worker_killed_under_load_is_replaced(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0"))
    async with KeepAliveLoad(f"{c.url}/", concurrency=4) as load:
        await load.wait_requests(200)
        os.kill(c.worker_pids[1], signal.SIGKILL)
        await c.wait_for(r"worker 1 \(pid \d+\) was killed by SIGKILL unexpectedly; restarting")
        await c.wait_for(r"worker 3 \(pid \d+\) listening on")
        before = load.result.workers[3]
        await c.wait_for("TEST on_startup worker=3")
        await load.wait_requests(300)
    result = load.result
    # Only requests in flight on the killed worker's connections may fail: one per client.
    assert result.failed <= 4, result.errors
    assert result.ok > 400
    assert result.workers[3] >= before


async def test_a_blocked_event_loop_is_dumped_killed_and_replaced(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "--timeout", "1.5")
    )
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.get(f"{c.url}/block?s=60"))
        m = await c.wait_for(r"TEST block-started worker=(\d+)")
        hung = m.group(1)
        await c.wait_for(rf"worker {hung} \(pid \d+\) is hung: no heartbeat")
        # faulthandler's dump names the function that blocks the loop.
        await c.wait_for(r'File ".*webapp\.py", line \d+ in block')
        await c.wait_for(rf"worker {hung} \(pid \d+\) was killed by SIGKILL unexpectedly")
        await c.wait_for(r"worker 3 \(pid \d+\) listening on")
        with pytest.raises(aiohttp.ClientError):
            await request
    async with aiohttp.ClientSession() as s, s.get(f"{c.url}/") as r:
        assert r.status == 200


async def test_max_requests_recycles_without_failing_a_request(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(
        *cli(
            "run",
            "webapp:app",
            "-w",
            "2",
            "-b",
            "127.0.0.1:0",
            "--max-requests",
            "100",
            "--max-requests-jitter",
            "20",
        )
    )
    async with KeepAliveLoad(f"{c.url}/", concurrency=6) as load:
        await c.wait_for(r"replacing worker 1 \(pid \d+\) \(served \d+ requests, limit 1[012]\d\)")
        await c.wait_for(r"worker \d+ \(pid \d+\) is listening; draining worker 1 ")
        await c.wait_for(r"worker 1 \(pid \d+\) exited with code 0")
        await load.wait_requests(200)
    result = load.result
    assert result.failed == 0, result.errors[:5]


async def test_two_reloads_under_keepalive_load_fail_no_request(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    write_app(tmp_path, "v1")
    c = await start_cluster(
        *cli("run", "versioned:app", "-w", "2", "-b", "127.0.0.1:0", "--graceful-timeout", "10"),
        cwd=tmp_path,
    )
    assert await version_of(c.url) == "v1"
    async with KeepAliveLoad(f"{c.url}/", concurrency=8) as load:
        await reload_twice_under(load, c, lambda: write_app(tmp_path, "v2"))
    result = load.result
    assert result.failed == 0, result.errors[:5]
    # The last reload's workers served the end of the load (the old ones were draining).
    assert max(result.workers) >= 5
    assert await version_of(c.url) == "v2"  # workers load the code afresh
    assert await c.stop() == 0


@pytest.mark.parametrize(
    ("start", "stopped"),
    [
        # The new zygote cannot load the program: no worker is touched.
        ("fork", "reload stopped: the program failed to load; the old workers keep serving"),
        # The first new worker fails to start; the old ones stay.
        ("spawn", "reload stopped: a new worker could not start; the old ones keep serving"),
    ],
)
async def test_a_reload_into_broken_code_keeps_the_old_workers(
    start_cluster: StartCluster, tmp_path: Path, start: str, stopped: str
) -> None:
    write_app(tmp_path, "v1")
    c = await start_cluster(
        *cli("run", "versioned:app", "-w", "2", "-b", "127.0.0.1:0", "--start", start),
        cwd=tmp_path,
    )
    write_app(tmp_path, "v2", broken=True)
    c.signal(signal.SIGHUP)
    await c.wait_for("RuntimeError: version v2 is broken")
    await c.wait_for(stopped)
    assert await version_of(c.url) == "v1"
    assert c.proc is not None
    assert c.proc.returncode is None
    # The old workers made room for the failed load, and have their own priority back.
    alive = [pid for pid in c.worker_pids.values() if pid_alive(pid)]
    assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in alive} == {0}
    if start == "fork":
        # A crash now is restarted from the zygote that still holds v1.
        victim = min(c.worker_pids)
        os.kill(c.worker_pids[victim], signal.SIGKILL)
        await c.wait_for(rf"worker {victim} \(pid \d+\) was killed by SIGKILL")
        await c.wait_for(r"worker 3 \(pid \d+\) listening on")
        assert {await version_of(c.url) for _ in range(4)} == {"v1"}
    write_app(tmp_path, "v3")
    mark = len(c.lines)
    c.signal(signal.SIGHUP)
    await c.wait_for("reload complete: 2 workers replaced", start=mark)
    # Told to drain is not yet closed: wait for both replaced workers to be gone (the broken
    # v2 worker exited with 4, a killed one by SIGKILL: only these two exit with 0).
    await c.wait_count(r"worker \d+ \(pid \d+\) exited with code 0", 2)
    assert await version_of(c.url) == "v3"


async def test_ttin_adds_and_ttou_removes_a_worker(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0"))
    c.signal(signal.SIGTTIN)
    await c.wait_for("scaling from 2 to 3 workers")
    await c.wait_for(r"worker 3 \(pid \d+\) listening on")
    c.signal(signal.SIGTTOU)
    await c.wait_for("scaling from 3 to 2 workers")
    await c.wait_for(r"scaling down: draining worker 3 \(pid \d+\) \(slot 3\)")
    await c.wait_for(r"worker 3 \(pid \d+\) exited with code 0")
    c.signal(signal.SIGTTOU)
    await c.wait_for(r"scaling down: draining worker 2 ")
    c.signal(signal.SIGTTOU)
    await c.wait_for(r"SIGTTOU received: ignored \(1 workers\)")
    # Told to drain is not yet closed: until it exits, worker 2 may still accept a connection.
    await c.wait_for(r"worker 2 \(pid \d+\) exited with code 0")
    async with aiohttp.ClientSession() as s, s.get(f"{c.url}/") as r:
        assert (await r.json())["worker"] == 1
    assert await c.stop() == 0


async def test_max_memory_recycles_a_worker(start_cluster: StartCluster) -> None:
    # Every interpreter with aiohttp loaded is well over 10 MiB: worker 1 must be recycled.
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--max-memory", "10M")
    )
    await c.wait_for(r"replacing worker 1 \(pid \d+\) \(uses \d+ MiB, limit 10 MiB\)")
    await c.wait_for(r"worker 2 \(pid \d+\) is listening; draining worker 1 ")
    await c.wait_for(r"worker 1 \(pid \d+\) exited with code 0")


async def test_a_reload_overlaps_starts_and_drains(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "4", "-b", "127.0.0.1:0", "--reload-batch", "2")
    )
    c.signal(signal.SIGHUP)
    await c.wait_for("reload complete: 4 workers replaced")
    for old in range(1, 5):
        await c.wait_for(rf"worker {old} \(pid \d+\) exited with code 0")
    out = c.output

    def at(pattern: str) -> int:
        found = re.search(pattern, out)
        assert found, pattern
        return found.start()

    def starts(old: int) -> int:
        return at(rf"replacing worker {old} \(pid \d+\) \(reload\): starting its successor")

    # Two successors start at once (the window), before the first of them listens...
    assert starts(2) < at(r"is listening; draining worker 1 ")
    # ...and the next ones start while the old workers they follow still drain.
    assert starts(3) < at(r"worker 1 \(pid \d+\) exited")
    assert starts(4) < at(r"worker 2 \(pid \d+\) exited")
    assert await c.stop() == 0


async def test_reload_in_batches(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "--reload-batch", "2")
    )
    c.signal(signal.SIGHUP)
    await c.wait_for("reload: replacing 2 workers, 2 at a time")
    await c.wait_for("reload complete: 2 workers replaced")
    assert set(c.worker_pids) == {1, 2, 3, 4}
    assert await c.stop() == 0


def release(gate: Path) -> None:
    """Let a load held by ``held_load`` go on (blocks until it opens the FIFO)."""
    fd = os.open(gate, os.O_WRONLY)
    os.write(fd, b"x")
    os.close(fd)


async def test_the_old_workers_make_room_while_the_new_program_loads(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    """The new zygote's load runs at once: the serving workers' nice value is raised while it
    loads, and each is set back when it is told to drain (they go on serving meanwhile)."""
    if not can_restore(0):
        pytest.skip("setting a nice value back needs CAP_SYS_NICE or an RLIMIT_NICE of 20")
    gate, hold = tmp_path / "gate", tmp_path / "hold"
    os.mkfifo(gate)
    c = await start_cluster(
        *cli("run", "held_load:app", "-w", "2", "-b", "127.0.0.1:0", "--graceful-timeout", "20"),
        env={"GATE": str(gate), "HOLD": str(hold)},
    )
    old = set(c.worker_pids.values())
    assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in old} == {0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        # A stream keeps its old worker draining after the reload, to be looked at then.
        stream = await session.get(f"{c.url}/sse?s=60")
        assert (await stream.content.readline()).startswith(b"data: tick")
        hold.touch()
        c.signal(signal.SIGHUP)
        await c.wait_for("TEST load-held", timeout=10)
        assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in old} == {YIELD_NICE}
        assert c.count(r"reload: 2 serving workers run at nice \+10 until each is told") == 1
        assert (await session.get(f"{c.url}/")).status == 200  # still serving meanwhile
        await asyncio.wait_for(asyncio.to_thread(release, gate), timeout=10)
        await c.wait_for("reload complete: 2 workers replaced", timeout=15)
        draining = [pid for pid in old if pid_alive(pid)]
        assert draining, "the stream's worker should still be draining"
        assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in draining} == {0}
        new = set(c.worker_pids.values()) - old
        assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in new} == {0}
        stream.close()
    assert await c.stop() == 0


@pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv"
)
async def test_without_the_privilege_to_undo_it_no_worker_is_reniced(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    """Root without CAP_SYS_NICE (as in a Docker container) could raise the nice values but
    not set them back: nothing is changed."""
    gate, hold = tmp_path / "gate", tmp_path / "hold"
    os.mkfifo(gate)
    unprivileged = ["setpriv", "--bounding-set", "-sys_nice", "--inh-caps", "-sys_nice", "--"]
    c = await start_cluster(
        *unprivileged,
        *cli("run", "held_load:app", "-w", "2", "-b", "127.0.0.1:0"),
        env={"GATE": str(gate), "HOLD": str(hold)},
    )
    old = set(c.worker_pids.values())
    hold.touch()
    c.signal(signal.SIGHUP)
    await c.wait_for("TEST load-held", timeout=10)
    assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in old} == {0}
    await asyncio.wait_for(asyncio.to_thread(release, gate), timeout=10)
    await c.wait_for("reload complete: 2 workers replaced", timeout=15)
    assert c.count("could not set the nice value") == 0
    assert c.count("serving workers run at nice") == 0
    assert await c.stop() == 0
