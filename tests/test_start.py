"""Start methods: workers forked from a zygote (the default on Linux), or spawned afresh."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from pathlib import Path

import pytest

from .actions import open_gate, reload_and_wait
from .conftest import StartCluster
from .harness import ClusterProcess, cli, pid_alive, wait_pid_gone
from .test_cluster import free_port, get_json

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="start method fork is Linux-only")

ZYGOTE = r"zygote \(pid (\d+)\) loaded the program; forking workers from it"
# Under rr the primary hands connections out in strict rotation: N new connections, N workers.
RR = ("--policy", "rr")


async def probe_each(c: ClusterProcess, n: int) -> list[dict[str, object]]:
    """One /probe answer from each of ``n`` workers (policy rr rotates over them in order)."""
    answers = [await get_json(f"{c.url}/probe") for _ in range(n)]
    assert len({a["worker"] for a in answers}) == n, answers
    return answers


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def shared_dirty_kib(pid: int) -> int:
    """Pages written before the fork and still shared with the zygote (copy-on-write)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Shared_Dirty:"):
                return int(line.split()[1])
    raise AssertionError("no Shared_Dirty in smaps_rollup")


async def test_workers_are_forked_from_the_zygote_by_default(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", *RR))
    assert c.proc is not None
    zygote = int((await c.wait_for(ZYGOTE)).group(1))
    answers = await probe_each(c, 2)
    for a in answers:
        # Re-parented to the primary (double fork), in a process group of its own in the
        # primary's session like a spawned worker, told its id through the environment as
        # under spawn.
        assert a["ppid"] == c.proc.pid
        assert a["sid"] == os.getsid(c.proc.pid)
        assert a["pgid"] == a["pid"]
        assert a["env_worker"] == str(a["worker"])
        # The application was imported once, by the zygote, not by the worker.
        assert a["imported_in"] == zygote
        assert isinstance(a["pid"], int)
        assert shared_dirty_kib(a["pid"]) > 4096, "the zygote's loaded pages are not shared"
    # Each worker reseeded its random generator after the fork.
    assert answers[0]["random"] != answers[1]["random"]
    assert pid_alive(zygote)
    assert await c.stop() == 0
    await wait_pid_gone(zygote, 10)
    assert "Traceback" not in c.output


async def test_forked_workers_collect_garbage(start_cluster: StartCluster) -> None:
    """The zygote loads with the collector paused; its workers, and a reload's, collect."""
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", *RR))
    await c.wait_for(ZYGOTE)
    for a in await probe_each(c, 2):
        assert a["threshold_at_import"] == 0  # the zygote imported the app with it paused
        assert a["collects"] is True
        assert a["thresholds"] == list(gc.get_threshold())  # Python's defaults, as here
        # What the zygote loaded was frozen: a worker's collector sees only its own objects.
        assert isinstance(a["seen_by_collector"], int) and a["seen_by_collector"] < 20_000
    await reload_and_wait(c, 2)  # forked from a new zygote, a fresh interpreter
    for a in await probe_each(c, 2):
        assert a["threshold_at_import"] == 0
        assert a["collects"] is True
        assert a["thresholds"] == list(gc.get_threshold())
    assert await c.stop() == 0


@pytest.mark.parametrize(
    ("choice", "collects", "thresholds"),
    [("off", False, None), ("threshold", True, [5000, 20, 20])],
)
async def test_the_programs_own_collector_settings_reach_its_workers(
    start_cluster: StartCluster, choice: str, collects: bool, thresholds: list[int] | None
) -> None:
    """gc.disable() or gc.set_threshold() at import, in the zygote, holds in every worker."""
    argv = cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", *RR)
    c = await start_cluster(*argv, env={"WEBAPP_GC": choice})
    await c.wait_for(ZYGOTE)
    for a in await probe_each(c, 2):
        assert a["collects"] is collects
        assert a["thresholds"] == (thresholds or list(gc.get_threshold()))
    assert await c.stop() == 0


async def test_the_first_workers_head_start_is_bounded(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    """The primary forks the others once worker 1 listens, or a moment later if it does not:
    a worker 1 held in its factory does not hold up worker 2."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    c = await start_cluster(
        *cli("run", "webapp:slow_factory", "--factory", "-w", "2", "-b", "127.0.0.1:0"),
        env={"GATE": str(gate)},
        ready=False,
    )
    await c.wait_count("TEST factory-waiting", 2)  # both started; neither listens
    assert c.count(r"listening on") == 0
    await open_gate(c, gate)
    assert c.count(r"worker \d \(pid \d+\) listening on") == 2
    assert await c.stop() == 0


async def test_spawn_starts_fresh_interpreters(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "--start", "spawn", *RR)
    )
    for a in await probe_each(c, 2):
        assert a["imported_in"] == a["pid"]
    assert "zygote" not in c.output
    assert await c.stop() == 0


async def test_threads_at_import_make_the_cluster_spawn(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "threaded_app:app", "-w", "2", "-b", "127.0.0.1:0", *RR))
    await c.wait_for(
        r"start method fork is not available \(the program started threads before "
        r"aiocluster\.run\(\): import-time-poller\); spawning workers"
    )
    for a in await probe_each(c, 2):
        assert a["imported_in"] == a["pid"]
    assert await c.stop() == 0


async def test_serve_in_the_programs_own_loop_cannot_fork(start_cluster: StartCluster) -> None:
    port = free_port()
    c = await start_cluster(sys.executable, "own_loop.py", str(port))
    await c.wait_for(
        r"start method fork is not available \(aiocluster\.serve\(\) was awaited in the "
        r"program's own event loop\); spawning workers"
    )
    a = await get_json(f"http://127.0.0.1:{port}/probe")
    assert a["imported_in"] == a["pid"]
    assert await c.stop() == 0


async def test_a_killed_zygote_is_replaced_when_it_is_needed(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", *RR))
    first = int((await c.wait_for(ZYGOTE)).group(1))
    os.kill(first, signal.SIGKILL)
    await wait_pid_gone(first, 10)
    mark = len(c.lines)
    os.kill(c.worker_pids[1], signal.SIGKILL)
    second = int((await c.wait_for(ZYGOTE, start=mark)).group(1))
    assert second != first
    await c.wait_for(r"worker 3 \(pid \d+\) listening on", start=mark)
    imported = {a["worker"]: a["imported_in"] for a in await probe_each(c, 2)}
    assert imported == {2: first, 3: second}
    assert await c.stop() == 0


async def test_the_zygote_exits_with_a_killed_primary(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0"))
    assert c.proc is not None
    zygote = int((await c.wait_for(ZYGOTE)).group(1))
    c.proc.kill()
    await c.proc.wait()
    # It reads its channel to the primary, and exits when that closes.
    await wait_pid_gone(zygote, 10)
    for pid in c.worker_pids.values():
        await wait_pid_gone(pid, 10)


async def test_orphans_of_a_worker_are_not_left_to_the_primary(
    start_cluster: StartCluster,
) -> None:
    """The primary is a child subreaper only while a fork is in flight: a process that a
    worker started and left behind goes past it (here, to the test: a subreaper too)."""
    c = await start_cluster(*cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0"))
    assert c.proc is not None
    await c.wait_for(ZYGOTE)
    data = await get_json(f"{c.url}/orphan")
    orphan, worker = data["child"], data["pid"]
    assert isinstance(orphan, int) and isinstance(worker, int)
    try:
        os.kill(worker, signal.SIGKILL)
        await wait_pid_gone(worker, 10)
        assert parent_of(orphan) == os.getpid()
    finally:
        os.kill(orphan, signal.SIGKILL)
        await wait_pid_gone(orphan, 10)
    assert await c.stop() == 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AIOCLUSTER_START": "vfork"}, "AIOCLUSTER_START"),
        ({}, "--start"),
    ],
)
async def test_a_bad_start_method_is_a_clear_error(env: dict[str, str], message: str) -> None:
    args = ["--start", "clone"] if not env else []
    proc = await asyncio.create_subprocess_exec(
        *cli("run", "webapp:app", *args),
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    text = out.decode()
    assert message in text and "fork" in text and "spawn" in text
    assert "Traceback" not in text
