"""Operations with real processes: control commands, admin endpoint, systemd, configuration."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .actions import open_gate
from .conftest import StartCluster
from .harness import APPS, ClusterProcess, cli

pytestmark = pytest.mark.timeout(60)


async def command(c: ClusterProcess, *args: str) -> tuple[int, str]:
    """Run ``aiocluster ARGS`` against cluster ``c`` (same runtime dir); exit status and output."""
    proc = await asyncio.create_subprocess_exec(
        *cli(*args), env=c.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_status_reload_scale_stop_commands(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0"))
    code, out = await command(c, "status")
    assert code == 0, out
    assert "2 of 2 workers listening" in out
    header = out.splitlines()[1].split()
    assert header == [
        "id",
        "slot",
        "pid",
        "state",
        "uptime",
        "restarts",
        "conns",
        "requests",
        "memory",
        "lag",
    ]
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [row[3] for row in rows] == ["listening", "listening"]

    code, out = await command(c, "status", "--json")
    status = json.loads(out)
    assert status["size"] == 2
    assert {w["pid"] for w in status["workers"]} == set(c.worker_pids.values())

    code, out = await command(c, "reload")
    assert (code, out.strip()) == (0, "reloaded: 2 workers replaced")
    await c.wait_count(r"worker [12] \(pid \d+\) exited with code 0", 2)

    code, out = await command(c, "scale", "3")
    assert code == 0, out
    await c.wait_for(r"worker 5 \(pid \d+\) listening on")
    code, out = await command(c, "status", "--json")
    assert json.loads(out)["size"] == 3

    code, out = await command(c, "stop")
    assert code == 0, out
    assert out.strip().endswith("stopped")
    assert await c.wait() == 0


async def test_commands_without_a_cluster_say_so(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        *cli("status", "--name", "nothing"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "no cluster is running here" in out.decode()
    assert "Traceback" not in out.decode()


async def test_control_socket_is_private(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--name", "private")
    )
    path = Path(c.runtime_dir) / "aiocluster" / "private.sock"
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    # The same name twice is refused before a single worker starts.
    second = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--name", "private"),
        env={"XDG_RUNTIME_DIR": c.runtime_dir},
        ready=False,
    )
    assert await second.wait() == 2  # a configuration error: one line, like a bad option
    assert "aiocluster: error: a cluster is already running with control socket" in second.output
    assert not second.worker_pids
    assert await c.stop() == 0
    assert not path.exists()


# The project's interpreter lives where other users may not read; the system one is enough
# for a client that only needs the socket module.
SYSTEM_PYTHON = "/usr/bin/python3"
as_nobody = pytest.mark.skipif(
    os.getuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root (to act as another user) and a system python3",
)
NOBODY = 65534


@as_nobody
async def test_another_user_is_refused(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0"))
    path = Path(c.runtime_dir) / "aiocluster" / "webapp.sock"
    os.chmod(c.runtime_dir, 0o755)  # let them reach our 0700 directory's parent
    probe = (
        "import socket, sys\n"
        "for target in sys.argv[1:]:\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    try:\n"
        "        s.connect(target)\n"
        "        print('connected')\n"
        "    except PermissionError:\n"
        "        print('denied')\n"
    )
    # The socket file's own mode (0600) refuses them even with the directory opened up.
    os.chmod(path.parent, 0o755)
    proc = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, "-c", probe, str(path), user=NOBODY, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert out.decode().split() == ["denied"]


@pytest.mark.skipif(not hasattr(socket, "SO_PEERCRED"), reason="SO_PEERCRED is Linux")
@as_nobody
async def test_peer_credentials_are_checked() -> None:
    from aiocluster.ops.control import peer_uid

    folder = Path(tempfile.mkdtemp())  # pytest's tmp_path is private to root
    os.chmod(folder, 0o755)
    path = folder / "open.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    os.chmod(path, 0o666)  # no file permission stops them: only the credential check can
    server.listen()
    client = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON,
        "-c",
        f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(path)!r}); s.recv(1)",
        user=NOBODY,
    )
    server.settimeout(20)
    conn, _ = await asyncio.to_thread(server.accept)
    try:
        assert peer_uid(conn) == NOBODY
    finally:
        conn.close()
        server.close()
        await client.wait()
        shutil.rmtree(folder)


async def test_admin_health_ready_and_metrics(start_cluster: StartCluster, tmp_path: Path) -> None:
    admin = free_port()
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    c = await start_cluster(
        *cli(
            "run",
            "webapp:slow_factory",
            "--factory",
            "-w",
            "2",
            "-b",
            "127.0.0.1:0",
            "--admin",
            f"127.0.0.1:{admin}",
            "--timeout",
            "0.4",
        ),
        env={"GATE": str(gate)},
        ready=False,
    )
    await c.wait_for(r"admin endpoint at http://127\.0\.0\.1:\d+")
    await c.wait_count("TEST factory-waiting", 2)
    base = f"http://127.0.0.1:{admin}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/healthz") as r:
            assert r.status == 200
        async with s.get(f"{base}/readyz") as r:
            assert r.status == 503  # the workers are still starting
            assert "0/2 workers listening" in await r.text()
        await open_gate(c, gate)
        async with s.get(f"{base}/readyz") as r:
            assert r.status == 200
        for _ in range(10):
            async with s.get(f"{c.url}/") as r:
                assert r.status == 200
        # Counters travel with heartbeats (every 0.1 s here): give them a few.
        total = 0.0
        for _ in range(100):
            async with s.get(f"{base}/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                metrics = {
                    sample.name: sample
                    for family in text_string_to_metric_families(await r.text())
                    for sample in family.samples
                    if not sample.labels
                }
                total = metrics["aiocluster_requests_total"].value
            if total >= 10:
                break
            await asyncio.sleep(0.1)
        assert total >= 10
        assert metrics["aiocluster_workers"].value == 2
        assert metrics["aiocluster_workers_listening"].value == 2
        async with s.get(f"{base}/metrics") as r:
            text = await r.text()
        for name in (
            "aiocluster_worker_requests_total",
            "aiocluster_worker_open_connections",
            "aiocluster_worker_resident_memory_bytes",
            "aiocluster_worker_event_loop_lag_seconds",
            "aiocluster_slot_restarts_total",
        ):
            assert f"{name}{{" in text, name
        assert 'slot="1",worker="1"' in text or 'worker="1",slot="1"' in text


async def test_socket_activation(start_cluster: StartCluster) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.set_inheritable(True)
    try:
        c = await start_cluster(
            sys.executable,
            str(APPS / "activate.py"),
            str(listener.fileno()),
            sys.executable,
            "-m",
            "aiocluster",
            "run",
            "webapp:app",
            "-w",
            "2",
            "-b",
            "127.0.0.1:1",
            pass_fds=(listener.fileno(),),
        )
    finally:
        listener.close()  # the cluster holds it now
    assert f"listening on 127.0.0.1:{port} (passed by the service manager)" in c.output
    assert "127.0.0.1:1" not in c.output  # -b is ignored: nothing was bound
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as r:
        assert (await r.json())["worker"] in (1, 2)
    assert await c.stop() == 0


async def test_notify_socket_messages(start_cluster: StartCluster, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(path))
    manager.setblocking(False)
    loop = asyncio.get_running_loop()

    async def next_message() -> str:
        async with asyncio.timeout(20):
            return (await loop.sock_recv(manager, 4096)).decode()

    try:
        c = await start_cluster(
            *cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0"),
            env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"},
        )
        seen: list[str] = []
        while not any("READY=1" in m for m in seen):
            seen.append(await next_message())
        ready = next(m for m in seen if "READY=1" in m)
        assert "STATUS=2 of 2 workers listening" in ready
        assert any(m == "WATCHDOG=1" for m in seen) or await next_message() == "WATCHDOG=1"

        c.signal(signal.SIGHUP)
        reload_messages: list[str] = []
        while not any("READY=1" in m for m in reload_messages):
            message = await next_message()
            if message != "WATCHDOG=1":
                reload_messages.append(message)
        assert "RELOADING=1" in reload_messages[0]
        assert "MONOTONIC_USEC=" in reload_messages[0]
        c.signal(signal.SIGTERM)
        message = await next_message()
        while message == "WATCHDOG=1":
            message = await next_message()
        assert message.startswith("STOPPING=1")
        assert await c.wait() == 0
        # Workers never speak to the service manager themselves.
        assert "NOTIFY_SOCKET" not in " ".join(c.lines)
    finally:
        manager.close()


async def test_options_from_the_environment(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app"),
        env={
            "AIOCLUSTER_WORKERS": "3",
            "AIOCLUSTER_BIND": "127.0.0.1:0",
            "AIOCLUSTER_LOG_LEVEL": "info",
        },
    )
    assert len(c.worker_pids) == 3
    # The command line wins over the environment.
    d = await start_cluster(
        *cli("run", "webapp:app", "-w", "1"),
        env={"AIOCLUSTER_WORKERS": "3", "AIOCLUSTER_BIND": "127.0.0.1:0"},
    )
    assert len(d.worker_pids) == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AIOCLUSTER_WORKERS": "many"}, "AIOCLUSTER_WORKERS='many': 'many' is not a whole number"),
        ({"AIOCLUSTER_ACCESS_LOG": "perhaps"}, "AIOCLUSTER_ACCESS_LOG='perhaps'"),
        ({"AIOCLUSTER_LOG_LEVEL": "loud"}, "AIOCLUSTER_LOG_LEVEL='loud'"),
        ({"AIOCLUSTER_NAME": "a/b"}, "cluster name 'a/b' may use only"),
        ({"AIOCLUSTER_MAX_MEMORY": "lots"}, "a memory size must be bytes"),
        (
            {"AIOCLUSTER_FACTORY": "1", "AIOCLUSTER_PROTOCOL": "1"},
            "--factory and --protocol exclude each other",
        ),
    ],
)
async def test_bad_environment_is_a_clear_error(
    start_cluster: StartCluster, env: dict[str, str], message: str
) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-b", "127.0.0.1:0"), env=env, ready=False)
    assert await c.wait() == 2
    assert message in c.output
    assert "Traceback" not in c.output


async def test_log_level_warning_is_quiet(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--log-level", "warning"),
        ready=False,
    )
    await c.wait_for("TEST on_startup")
    c.signal(signal.SIGTERM)
    assert await c.wait() == 0
    assert " INFO " not in c.output


async def test_help_names_every_environment_variable() -> None:
    proc = await asyncio.create_subprocess_exec(
        *cli("run", "--help"), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = " ".join(out.decode().split())  # argparse may wrap a line inside "[env: ...]"
    for var in (
        "AIOCLUSTER_WORKERS",
        "AIOCLUSTER_BIND",
        "AIOCLUSTER_TIMEOUT",
        "AIOCLUSTER_GRACEFUL_TIMEOUT",
        "AIOCLUSTER_ADMIN",
        "AIOCLUSTER_NAME",
    ):
        assert f"[env: {var}]" in text


def test_admin_warns_unless_loopback() -> None:
    # Pure check only: tests never listen beyond loopback.
    from aiocluster.ops.admin import _is_loopback

    assert _is_loopback("127.0.0.1")
    assert _is_loopback("127.8.9.10")
    assert _is_loopback("::1")
    assert _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0")
    assert not _is_loopback("10.1.2.3")
    assert not _is_loopback("::")


@pytest.mark.parametrize("which", ["admin", "control"])
async def test_a_taken_admin_or_control_address_is_one_line(
    start_cluster: StartCluster, tmp_path: Path, which: str
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    option = (
        ["--admin", f"127.0.0.1:{taken.getsockname()[1]}"]
        if which == "admin"
        else ["--control", str(blocker / "c.sock")]
    )
    try:
        c = await start_cluster(
            *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", *option), ready=False
        )
        assert await c.wait(timeout=10) == 2
    finally:
        taken.close()
    errors = [line for line in c.lines if line.startswith("aiocluster: error: ")]
    assert len(errors) == 1, c.output
    assert ("admin endpoint" if which == "admin" else "control") in errors[0]
    assert "Traceback" not in c.output


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """One /metrics scrape: ``name{labels}`` -> value."""
    async with session.get(url) as r:
        assert r.status == 200
        text = await r.text()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}"] = sample.value
    return found


async def test_request_totals_never_go_backwards_across_a_reload(
    start_cluster: StartCluster,
) -> None:
    admin = free_port()
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--admin", f"127.0.0.1:{admin}"),
        *("--timeout", "0.4"),  # heartbeats, which carry the counters, every 0.1 s
    )
    metrics_url = f"http://127.0.0.1:{admin}/metrics"
    async with aiohttp.ClientSession() as s:
        for _ in range(20):
            async with s.get(f"{c.url}/") as r:
                assert r.status == 200
        before: dict[str, float] = {}
        async with asyncio.timeout(10):
            while before.get("aiocluster_requests_total{}", 0) < 20:
                before = await scrape(s, metrics_url)
                await asyncio.sleep(0.1)  # the next heartbeat
        c.signal(signal.SIGHUP)
        await c.wait_for("reload complete")
        await c.wait_for(r"worker 1 \(pid \d+\) exited with code 0")
        after = await scrape(s, metrics_url)
    assert after["aiocluster_requests_total{}"] >= before["aiocluster_requests_total{}"] >= 20
    assert after["aiocluster_slot_requests_total{slot=1}"] >= 20
    # The exited worker's own series is gone; its count lives on in the totals.
    assert "aiocluster_worker_requests_total{slot=1,worker=1}" not in after
