"""Process titles: ``ps`` tells the primary, the zygote and each worker apart (setproctitle)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import StartCluster
from .harness import ClusterProcess, cli, pid_alive, wait_pid_gone

pytestmark = pytest.mark.timeout(60)

ZYGOTE = r"zygote \(pid (\d+)\) loaded the program"


def cmdline(pid: int) -> str:
    """What ``ps`` shows for ``pid``: its command line, arguments joined by spaces."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


async def titles(c: ClusterProcess) -> dict[str, str]:
    """The titles of the primary, the live workers, and the zygote that forked the last."""
    assert c.proc is not None
    seen = {"primary": cmdline(c.proc.pid)}
    for worker_id, pid in c.worker_pids.items():
        if pid_alive(pid):
            seen[f"worker {worker_id}"] = cmdline(pid)
    zygotes = [int(m.group(1)) for line in c.lines if (m := re.search(ZYGOTE, line))]
    if zygotes:
        seen["zygote"] = cmdline(zygotes[-1])
    return seen


@pytest.mark.parametrize("start", ["fork", "spawn"])
async def test_each_process_has_its_title(start_cluster: StartCluster, start: str) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "-n", "blue", "--start", start)
    )
    expected = {
        "primary": "aiocluster primary [blue]",
        "worker 1": "aiocluster worker 1 slot 1 [blue]",
        "worker 2": "aiocluster worker 2 slot 2 [blue]",
    }
    if start == "fork":
        expected["zygote"] = "aiocluster zygote [blue]"
    assert await titles(c) == expected


async def test_a_replacement_keeps_the_slot_in_its_title(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "-n", "red"))
    c.signal(1)  # SIGHUP: every worker replaced, in its slot
    await c.wait_for(r"reload complete: 2 workers replaced")
    for old in (c.worker_pids[1], c.worker_pids[2]):
        await wait_pid_gone(old, 10)
    assert await titles(c) == {
        "primary": "aiocluster primary [red]",
        "zygote": "aiocluster zygote [red]",  # the reload's new one, spawned
        "worker 3": "aiocluster worker 3 slot 1 [red]",
        "worker 4": "aiocluster worker 4 slot 2 [red]",
    }


async def test_without_setproctitle_titles_are_not_set(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    # A setproctitle that cannot be imported, first on the path: as if it were not installed.
    (tmp_path / "setproctitle.py").write_text("raise ImportError('not installed')\n")
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "-n", "plain"),
        env={"PYTHONPATH": str(tmp_path)},
    )
    seen = await titles(c)
    assert seen["primary"].endswith("-m aiocluster run webapp:app -w 1 -b 127.0.0.1:0 -n plain")
    assert seen["worker 1"] == seen["primary"]  # forked: the zygote's, which is the primary's
    assert seen["zygote"] == seen["primary"]
