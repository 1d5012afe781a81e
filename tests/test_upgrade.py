"""Upgrading the primary in place, for real: a cluster installed (not editable) in a virtualenv,
its installed package changed, ``aiocluster upgrade`` (and SIGUSR2) under load."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import StartCluster
from .harness import APPS, ClusterProcess, wait_pid_gone
from .load import KeepAliveLoad
from .test_policies import needs_steering, worker_of

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only (pidfds)"),
]

ROOT = Path(__file__).resolve().parent.parent


class Install:
    """aiocluster installed from a wheel in a virtualenv of its own; its package can be edited."""

    def __init__(self, venv: Path) -> None:
        self.python = str(venv / "bin" / "python")
        purelib = subprocess.run(
            [self.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.package = Path(purelib) / "aiocluster"
        self._originals: dict[Path, str] = {}

    def argv(self, *args: str) -> list[str]:
        return [self.python, "-m", "aiocluster", *args]

    def edit(self, relative: str, old: str, new: str) -> None:
        path = self.package / relative
        text = path.read_text()
        self._originals.setdefault(path, text)
        assert old in text
        _rewrite(path, text.replace(old, new, 1))

    def set_version(self, version: str) -> None:
        path = self.package / "__init__.py"
        text = path.read_text()
        self._originals.setdefault(path, text)
        _rewrite(path, re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', text))

    def restore(self) -> None:
        for path, text in self._originals.items():
            _rewrite(path, text)
        self._originals.clear()


def _rewrite(path: Path, text: str) -> None:
    """Write ``text`` to the module at ``path`` and drop its bytecode, as an upgrade would.

    pip compiled the module at install time, and the bytecode is checked against the source's
    mtime in whole seconds and its size: "0.1.0" -> "9.9.9" within the install's second would
    otherwise run the old code (this made the test fail once).
    """
    path.write_text(text)
    Path(importlib.util.cache_from_source(str(path))).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    """One wheel of this checkout, installed without its dependencies into a new virtualenv
    that finds them (aiohttp...) in the test environment's site-packages through a .pth."""
    where = tmp_path_factory.mktemp("upgrade")
    wheels = where / "wheels"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *("-w", str(wheels), str(ROOT)),
        ],
        check=True,
        timeout=120,
    )
    venv = where / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    it = Install(venv)
    # Added as a plain path, not a site directory: the test environment's own .pth files (the
    # editable install of this checkout) are not read, so the wheel's copy is the one imported.
    (it.package.parent / "test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    wheel = next(wheels.glob("aiocluster-*.whl"))
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", it.python, "install", "-q"),
            *("--no-deps", "--no-index", str(wheel)),
        ],
        check=True,
        timeout=120,
    )
    yield it
    it.restore()


@pytest.fixture
def installed(install: Install) -> Iterator[Install]:
    yield install
    install.restore()


async def control(c: ClusterProcess, install: Install, *args: str) -> tuple[int, str]:
    """``aiocluster ARGS`` of the installed copy against ``c``; exit status and output."""
    proc = await asyncio.create_subprocess_exec(
        *install.argv(*args),
        env=c.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def status(c: ClusterProcess, install: Install) -> dict[str, Any]:
    code, out = await control(c, install, "status", "--json")
    assert code == 0, out
    result: dict[str, Any] = json.loads(out)
    return result


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def primary_pid(c: ClusterProcess) -> int:
    assert c.proc is not None
    return c.proc.pid


async def start(start_cluster: StartCluster, install: Install, *args: str) -> ClusterProcess:
    return await start_cluster(
        *install.argv("run", "webapp:app", "-b", "127.0.0.1:0", *args), cwd=APPS
    )


@pytest.mark.parametrize("policy", ["shared", "rr", "reuseport"])
async def test_upgrade_under_load_keeps_pid_workers_sockets(
    start_cluster: StartCluster, installed: Install, policy: str
) -> None:
    c = await start(start_cluster, installed, "-w", "2", "--policy", policy)
    pid = primary_pid(c)
    before = await status(c, installed)
    workers = {w["id"]: w["pid"] for w in before["workers"]}
    fds = fd_count(pid)
    url = c.url + "/"
    keep_alive = KeepAliveLoad(url, concurrency=4, max_requests=20_000, max_seconds=30)
    fresh = KeepAliveLoad(
        url, concurrency=4, max_requests=20_000, max_seconds=30, fresh_connections=True
    )
    async with keep_alive, fresh:
        await keep_alive.wait_requests(200)
        await fresh.wait_requests(100)
        installed.set_version("9.9.9")
        during = keep_alive.result.ok, fresh.result.ok
        code, out = await control(c, installed, "upgrade")
        assert code == 0, out + c.output
        # Both loads ran all through the pre-flight, the quiesce and the exec.
        assert keep_alive.result.ok > during[0] and fresh.result.ok > during[1]
        assert f"upgraded: the primary (pid {pid}) runs aiocluster 9.9.9" in out
        await keep_alive.wait_requests(200)
        await fresh.wait_requests(100)
    for load in (keep_alive, fresh):
        assert load.result.failed == 0, load.result.errors[:5]
    after = await status(c, installed)
    assert primary_pid(c) == pid and c.proc is not None and c.proc.returncode is None
    assert after["version"] == "9.9.9" and after["upgrades"] == 1
    assert after["code_started"] > before["code_started"]
    assert after["started"] == before["started"]
    assert {w["id"]: w["pid"] for w in after["workers"]} == workers
    assert after["zygote"] == before["zygote"] is not None  # the old image's zygote goes on
    assert c.count(r"started worker") == 2  # no worker was started by the upgrade
    assert c.count(r"the primary was upgraded in place to aiocluster 9\.9\.9") == 2
    assert fd_count(pid) == fds


@needs_steering
async def test_reuseport_rotation_carries_on_after_an_upgrade(
    start_cluster: StartCluster, installed: Install
) -> None:
    """The new image's rotation takes the sockets over (a socket is in one map only: the old
    image gives them up as it quiesces)."""
    c = await start(start_cluster, installed, "-w", "3", "--policy", "reuseport")
    code, out = await control(c, installed, "upgrade")
    assert code == 0, out + c.output
    order = [await worker_of(f"{c.url}/") for _ in range(9)]
    assert order[3:] == order[:-3] and sorted(order[:3]) == [1, 2, 3]
    assert c.count("reuseport: new connections go to the serving slots in turn") == 2


async def test_a_broken_install_is_refused_and_the_cluster_keeps_serving(
    start_cluster: StartCluster, installed: Install
) -> None:
    c = await start(start_cluster, installed, "-w", "2")
    pid = primary_pid(c)
    workers = {w["pid"] for w in (await status(c, installed))["workers"]}
    fds = fd_count(pid)
    installed.set_version("9.9.9")
    installed.edit("primary/fleet.py", "class Fleet:", "class Fleet(:")
    async with KeepAliveLoad(c.url + "/", concurrency=4, max_seconds=20) as load:
        await load.wait_requests(100)
        code, out = await control(c, installed, "upgrade")
        assert code == 1, out
        assert out.startswith("aiocluster: error: upgrade refused: the new code failed its")
        assert "fleet.py" in out and len(out.strip().splitlines()) == 1
        await load.wait_requests(200)
    assert load.result.failed == 0, load.result.errors[:5]
    now = await status(c, installed)
    assert now["version"] != "9.9.9" and now["upgrades"] == 0
    assert {w["pid"] for w in now["workers"]} == workers
    assert primary_pid(c) == pid and fd_count(pid) == fds
    assert c.count("upgrading in place: exec") == 0


async def test_a_new_image_that_dies_before_resuming_lets_the_workers_drain(
    start_cluster: StartCluster, installed: Install
) -> None:
    """The failure the pre-flight cannot catch: the new image fails after the exec."""
    c = await start(start_cluster, installed, "-w", "2")
    workers = {w["pid"] for w in (await status(c, installed))["workers"]}
    installed.edit(
        "_entry.py",
        "    resumed = read_state()\n",
        "    resumed = read_state()\n"
        "    raise AioclusterError('injected: the new image fails before it resumes')\n",
    )
    code, out = await control(c, installed, "upgrade")
    assert code == 1
    assert "the primary closed the control connection without answering" in out
    assert await c.wait(20) == 1
    assert "injected: the new image fails before it resumes" in c.output
    # Each worker saw its channel close and drained by itself: none is left behind.
    await c.wait_count(r"lost the channel to the primary .*; stopping", 2)
    for pid in workers:
        await wait_pid_gone(pid, 15)


async def test_systemd_sees_reloading_then_ready_and_the_pid_file_stays(
    start_cluster: StartCluster, installed: Install, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    pidfile = tmp_path / "primary.pid"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(path))
    manager.setblocking(False)
    loop = asyncio.get_running_loop()

    async def until(text: str) -> list[str]:
        seen: list[str] = []
        async with asyncio.timeout(20):
            while not any(text in m for m in seen):
                seen.append((await loop.sock_recv(manager, 4096)).decode())
        return seen

    with manager:
        c = await start_cluster(
            *installed.argv("run", "webapp:app", "-b", "127.0.0.1:0", "--pid", str(pidfile)),
            cwd=APPS,
            env={"NOTIFY_SOCKET": str(path)},
        )
        await until("READY=1")
        pid = primary_pid(c)
        assert pidfile.read_text().strip() == str(pid)
        installed.set_version("9.9.9")
        c.signal(signal.SIGUSR2)
        seen = await until("READY=1")
        assert seen[0].startswith("RELOADING=1") and "STATUS=upgrading the primary" in seen[0]
        assert "MONOTONIC_USEC=" in seen[0]
        await c.wait_for(r"upgraded in place to aiocluster 9\.9\.9")
        assert pidfile.read_text().strip() == str(pid)  # the same main pid: nothing to rewrite
        assert await c.stop() == 0
        assert not pidfile.exists()  # removed at the stop, by the new image
        assert "NOTIFY_SOCKET" not in c.output


@pytest.mark.timeout(120)
async def test_twenty_upgrades_in_a_row_leak_nothing(
    start_cluster: StartCluster, installed: Install
) -> None:
    """Half by the command, half by SIGUSR2; then ``--workers`` moves the workers too."""
    c = await start(start_cluster, installed, "-w", "1", "--admin", "127.0.0.1:0")
    pid = primary_pid(c)
    workers = {w["pid"] for w in (await status(c, installed))["workers"]}
    fds = fd_count(pid)
    for n in range(1, 21):
        installed.set_version(f"1.0.{n}")
        if n % 2:
            code, out = await control(c, installed, "upgrade")
            assert code == 0, out
        else:
            c.signal(signal.SIGUSR2)
        await c.wait_for(rf"upgraded in place to aiocluster 1\.0\.{n}: .*\(upgrade {n}\)")
    now = await status(c, installed)
    assert now["version"] == "1.0.20" and now["upgrades"] == 20
    assert {w["pid"] for w in now["workers"]} == workers
    assert fd_count(pid) == fds
    code, out = await control(c, installed, "upgrade", "--workers")
    assert code == 0, out
    assert "every worker replaced" in out
    now = await status(c, installed)
    assert now["upgrades"] == 21 and not {w["pid"] for w in now["workers"]} & workers
    assert primary_pid(c) == pid
