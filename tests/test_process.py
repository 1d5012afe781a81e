"""The process options on real clusters: --user/--group, the privileged-listen guard, --pid,
--umask and --chdir.

The --user tests need root (they run as root here) and an interpreter the user ``nobody`` can
run: this one, or else the system's Python of the same version with this environment's
packages on its path (a Python under a private home directory is closed to other users).
"""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

import aiocluster

from .conftest import StartCluster
from .harness import APPS, cli, pid_alive
from .test_cluster import get_json

pytestmark = pytest.mark.timeout(60)

REPO = Path(aiocluster.__file__).resolve().parent.parent
ZYGOTE = r"zygote \(pid (\d+)\) loaded the program"


def status_ids(pid: int, field: str) -> list[int]:
    """The ``Uid:``/``Gid:`` line of /proc/PID/status: real, effective, saved, fs."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return [int(n) for n in line.split()[1:]]
    raise AssertionError(f"no {field} for pid {pid}")


def proc_umask(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"no Umask for pid {pid}")


@pytest.fixture(scope="module")
def nobody_python() -> Iterator[tuple[list[str], dict[str, str]]]:
    """``python -m aiocluster`` and the environment for a cluster whose workers run as nobody."""
    if os.geteuid() != 0:
        pytest.skip("--user needs the tests to run as root")
    nobody = pwd.getpwnam("nobody")
    site = next(p for p in sys.path if p.endswith("site-packages"))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates: list[tuple[str, dict[str, str]]] = [(sys.executable, {})]
    system = shutil.which(version, path="/usr/bin:/usr/local/bin")
    if system is not None:
        candidates.append((system, {"PYTHONPATH": f"{REPO}:{site}"}))
    for exe, env in candidates:
        try:
            probe = subprocess.run(
                [exe, "-c", "import aiohttp, aiocluster"],
                env={**os.environ, **env},
                user=nobody.pw_uid,
                group=nobody.pw_gid,
                extra_groups=[],
                cwd="/",
                capture_output=True,
                check=False,
                timeout=30,
            )
        except PermissionError:
            continue  # under a directory closed to nobody
        if probe.returncode == 0:
            yield [exe, "-m", "aiocluster"], env
            return
    pytest.skip("no interpreter here can be run by the user nobody")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="aiocluster-proc-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def free_privileged_port() -> int:
    for port in range(1023, 900, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


# -- --user / --group ----------------------------------------------------------------------


@pytest.mark.parametrize("start", ["fork", "spawn"])
async def test_user_nobody_runs_the_zygote_and_workers_not_the_primary(
    start_cluster: StartCluster,
    nobody_python: tuple[list[str], dict[str, str]],
    shared_dir: Path,
    start: str,
) -> None:
    command, env = nobody_python
    control = shared_dir / "control" / "c.sock"
    pidfile = shared_dir / "c.pid"
    c = await start_cluster(
        *command,
        *("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "--start", start),
        *("--user", "nobody", "--control", str(control), "--pid", str(pidfile)),
        env=env,
    )
    assert c.proc is not None
    nobody = pwd.getpwnam("nobody")
    assert status_ids(c.proc.pid, "Uid") == [0, 0, 0, 0]
    served = [c.worker_pids[1], c.worker_pids[2]]
    if start == "fork":
        served.append(int((await c.wait_for(ZYGOTE)).group(1)))
    for pid in served:
        assert status_ids(pid, "Uid") == [nobody.pw_uid] * 4, pid
        assert status_ids(pid, "Gid") == [nobody.pw_gid] * 4, pid
    answer = await get_json(f"{c.url}/listen?port=0")
    assert (answer["uid"], answer["gid"], answer["errno"]) == (nobody.pw_uid, nobody.pw_gid, 0)
    # The control socket and the pid file are the user's, who may use them.
    assert control.stat().st_uid == control.parent.stat().st_uid == nobody.pw_uid
    assert pidfile.read_text() == f"{c.proc.pid}\n" and pidfile.stat().st_uid == nobody.pw_uid
    status = await asyncio.create_subprocess_exec(
        *command,
        *("status", "--control", str(control)),
        env={**os.environ, **env},
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        cwd="/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(status.communicate(), 30)
    assert status.returncode == 0, err
    assert f"primary pid {c.proc.pid}" in out.decode()
    assert await c.stop() == 0
    assert not pidfile.exists()


async def test_a_worker_cannot_use_the_primary_to_bind_what_its_user_could_not(
    start_cluster: StartCluster,
    nobody_python: tuple[list[str], dict[str, str]],
    shared_dir: Path,
) -> None:
    command, env = nobody_python
    configured = shared_dir / "app.sock"
    # Binding the configured port 80s and paths is what the primary keeps root for.
    low = free_privileged_port()
    c = await start_cluster(
        *command,
        *("run", "webapp:app", "-w", "1", "-b", f"127.0.0.1:{low}", "-b", f"unix:{configured}"),
        *("--user", "nobody", "--control", "off"),
        env=env,
    )
    assert c.url == f"http://127.0.0.1:{low}"
    assert (await get_json(f"{c.url}/listen?port=0"))["uid"] == pwd.getpwnam("nobody").pw_uid
    connector = aiohttp.UnixConnector(path=str(configured), force_close=True)
    assert (await get_json("http://localhost/", connector=connector))["pid"] == c.worker_pids[1]
    port = free_privileged_port()
    refused = await get_json(f"{c.url}/listen?port={port}")
    assert refused["errno"] == errno.EACCES, refused
    await c.wait_for(rf"cannot listen on 127\.0\.0\.1:{port}: \[Errno 13\] refused .*privileged")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # nothing was bound there
    stray = shared_dir / "stray.sock"
    refused = await get_json(f"{c.url}/listen?path={stray}")
    assert refused["errno"] == errno.EACCES and not stray.exists(), refused
    await c.wait_for(r"cannot listen on unix:.*stray\.sock: \[Errno 13\] refused .*Unix paths")
    # Unprivileged ports work as before.
    assert (await get_json(f"{c.url}/listen?port=0"))["errno"] == 0
    with socket.socket() as high:
        high.bind(("127.0.0.1", 0))
        free_high = high.getsockname()[1]
    assert (await get_json(f"{c.url}/listen?port={free_high}"))["errno"] == 0


async def test_without_user_a_worker_may_still_bind_a_privileged_port(
    start_cluster: StartCluster,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("binding a port below 1024 needs root")
    c = await start_cluster(*cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0"))
    assert (await get_json(f"{c.url}/listen?port={free_privileged_port()}"))["errno"] == 0


def run_cli(*args: str, cwd: Path = APPS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(*args), cwd=cwd, capture_output=True, text=True, check=False, timeout=30
    )


def test_an_unknown_user_or_group_is_one_line_and_exit_2() -> None:
    for flag, name in (("--user", "no-such-user-x"), ("--group", "no-such-group-x")):
        proc = run_cli("run", "webapp:app", flag, name)
        assert proc.returncode == 2
        assert proc.stderr.startswith(f"aiocluster: error: argument {flag}: no ")
        assert proc.stderr.count("\n") == 1


def test_a_user_this_python_is_closed_to_is_refused_at_start() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    # The interpreter under a private home (here /root/.pyenv), or a readable one: either
    # the start says so in one line, or this Python is open to nobody and the check is moot.
    proc = run_cli("run", "webapp:app", "--user", "nobody", "--control", "off", "-w", "1")
    if "closed to it" not in proc.stderr:
        pytest.skip("this interpreter is readable by nobody")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("aiocluster: error: --user/--group nobody")


# -- --pid ----------------------------------------------------------------------------------


async def test_the_pid_file_is_written_when_ready_and_removed_on_exit(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    pidfile = tmp_path / "app.pid"
    pidfile.write_text("999999999\n")  # left by a primary that was killed: stale
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "--pid", str(pidfile)),
        ready=False,
    )
    await c.wait_for(r"pid \d+ written to ")
    assert c.proc is not None
    ready = c.lines.index(next(line for line in c.lines if "ready: 2 workers" in line))
    written = c.lines.index(next(line for line in c.lines if "written to" in line))
    assert ready < written
    assert pidfile.read_text() == f"{c.proc.pid}\n"
    assert sorted(os.listdir(tmp_path)) == ["app.pid"]  # no temporary left
    assert await c.stop() == 0
    assert not pidfile.exists()


async def test_a_pid_file_naming_a_live_process_refuses_the_start(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # this test: alive
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--pid", str(pidfile)),
        ready=False,
    )
    assert await c.wait() == 2
    assert f"aiocluster: error: --pid {pidfile}: it names pid {os.getpid()}, which is running" in (
        c.output
    )
    assert pidfile.read_text() == f"{os.getpid()}\n"  # untouched
    assert not c.worker_pids


# -- --umask, --chdir -------------------------------------------------------------------------


async def test_umask_and_chdir_reach_every_process(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0"),
        *("--umask", "027", "--chdir", str(APPS)),
        cwd=tmp_path,  # webapp is found only from --chdir
    )
    assert c.proc is not None
    worker = c.worker_pids[1]
    zygote = int((await c.wait_for(ZYGOTE)).group(1))
    for pid in (c.proc.pid, zygote, worker):
        assert proc_umask(pid) == 0o027, pid
        assert os.readlink(f"/proc/{pid}/cwd") == str(APPS), pid


async def test_chdir_keeps_a_script_spawned_by_a_relative_path(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    # Spawned workers run `python env_app.py` again: from tmp_path, only if the path is absolute.
    d = await start_cluster(
        sys.executable,
        "env_app.py",
        "1",
        env={
            "AIOCLUSTER_BIND": "127.0.0.1:0",
            "AIOCLUSTER_START": "spawn",
            "AIOCLUSTER_CHDIR": str(tmp_path),
        },
    )
    assert os.readlink(f"/proc/{d.worker_pids[1]}/cwd") == str(tmp_path)
    assert all(pid_alive(pid) for pid in d.worker_pids.values())


def test_a_missing_chdir_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_cli("run", "webapp:app", "--chdir", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr == (
        f"aiocluster: error: --chdir {tmp_path / 'nope'}: No such file or directory\n"
    )
