"""TLS from the options: --certfile/--keyfile/--ca-certs/--cert-reqs and run(ssl_context=).

Real certificates (trustme), real clients; the handshake happens in the worker under every
policy, each new worker reads the files afresh (a reload rotates them), and a file that
cannot be used is one line and exit status 2 before anything starts.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import trustme

from .conftest import StartCluster
from .harness import APPS, ClusterProcess, cli
from .load import KeepAliveLoad

pytestmark = pytest.mark.timeout(60)


def write_cert(ca: trustme.CA, folder: Path, stem: str = "server") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by ``ca``, and its key, as PEM files."""
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def https_run(cert: Path, key: Path, *args: str) -> list[str]:
    """``aiocluster run client_app:app`` on a free port with this certificate and key."""
    return cli(
        "run", "client_app:app", "-b", "127.0.0.1:0", "--certfile", str(cert),
        "--keyfile", str(key), *args,
    )  # fmt: skip


def trusting(*cas: trustme.CA) -> ssl.SSLContext:
    client = ssl.create_default_context()
    for ca in cas:
        ca.configure_trust(client)
    return client


async def get_client(url: str, context: ssl.SSLContext) -> dict[str, object]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
        s.get(url, ssl=context, timeout=aiohttp.ClientTimeout(total=10)) as r,
    ):
        assert r.status == 200
        data = await r.json()
        assert isinstance(data, dict)
        return data


@pytest.mark.parametrize("policy", ["shared", "rr", "reuseport"])
async def test_certfile_and_keyfile_serve_https_under_every_policy(
    start_cluster: StartCluster, tmp_path: Path, policy: str
) -> None:
    ca = trustme.CA()
    cert, key = write_cert(ca, tmp_path)
    c = await start_cluster(
        *cli("run", "client_app:app", "-w", "2", "-b", "127.0.0.1:0", "--policy", policy),
        env={"AIOCLUSTER_CERTFILE": str(cert), "AIOCLUSTER_KEYFILE": str(key)},
    )
    url = f"https://{c.address}/client"
    workers = {(await get_client(url, trusting(ca)))["worker"] for _ in range(6)}
    if policy == "rr":
        assert workers == {1, 2}  # handed-over connections do their handshake in the worker
    data = await get_client(url, trusting(ca))
    assert (data["scheme"], data["secure"]) == ("https", True)
    # Plain HTTP on the TLS port is not served.
    with pytest.raises(aiohttp.ClientError):
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://{c.address}/client", timeout=aiohttp.ClientTimeout(total=5)) as r,
        ):
            assert r.status != 200
    assert await c.stop() == 0


@pytest.mark.parametrize("policy", ["shared", "rr"])
async def test_an_asgi_app_serves_https_and_wss_and_reloads_without_a_failed_request(
    start_cluster: StartCluster, tmp_path: Path, policy: str
) -> None:
    """A Starlette app on uvicorn's protocols: the TLS handshake in the worker (also for a
    connection the primary handed over), ``scope["scheme"]`` https and wss, keep-alive, and a
    rolling reload under keep-alive HTTPS load with no failed request."""
    ca = trustme.CA()
    cert, key = write_cert(ca, tmp_path)
    c = await start_cluster(
        *cli(
            "run", "asgi_app:app", "-w", "2", "-b", "127.0.0.1:0", "--policy", policy,
            "--certfile", str(cert), "--keyfile", str(key), "--graceful-timeout", "10",
        )
    )  # fmt: skip
    url = f"https://{c.address}/client"
    answers = [await get_client(url, trusting(ca)) for _ in range(6)]
    assert {(a["scheme"], a["secure"]) for a in answers} == {("https", True)}
    if policy == "rr":
        assert {a["worker"] for a in answers} == {1, 2}  # handshakes in both workers
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for _ in range(3):  # one keep-alive TLS connection, several requests
            async with s.get(url, ssl=trusting(ca)) as r:
                assert (await r.json())["scheme"] == "https"
        async with s.ws_connect(f"wss://{c.address}/ws-client", ssl=trusting(ca)) as ws:
            assert (await ws.receive_json(timeout=10))["scheme"] == "wss"
    # The certificate is checked: a client that does not trust it is refused.
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await get_client(url, ssl.create_default_context())
    async with KeepAliveLoad(url, concurrency=4, ssl_context=trusting(ca)) as load:
        await load.wait_requests(100)
        c.signal(signal.SIGHUP)
        await c.wait_for("reload complete: 2 workers replaced")
        await load.wait_requests(100)
    assert load.result.failed == 0, load.result.errors[:5]
    assert await c.stop() == 0
    assert "Traceback" not in c.output


async def test_client_certificates_required(start_cluster: StartCluster, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = write_cert(ca, tmp_path)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    c = await start_cluster(
        *https_run(
            cert, key, "-w", "1", "--ca-certs", str(tmp_path / "ca.pem"), "--cert-reqs", "required"
        )
    )
    url = f"https://{c.address}/client"
    with_cert = trusting(ca)
    ca.issue_cert("client@example.org").configure_cert(with_cert)
    assert (await get_client(url, with_cert))["peer_cert"] is True
    # Without a client certificate the worker's handshake refuses the connection.
    with pytest.raises(aiohttp.ClientError):
        await get_client(url, trusting(ca))
    assert await c.stop() == 0


async def test_a_reload_rotates_the_certificate_without_a_failed_request(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = write_cert(old_ca, tmp_path)
    c = await start_cluster(*https_run(cert, key, "-w", "2", "--graceful-timeout", "10"))
    url = f"https://{c.address}/client"
    await get_client(url, trusting(old_ca))
    # Renewed files, as certbot leaves them; the running workers keep the old certificate.
    renewed = write_cert(new_ca, tmp_path, "renewed")
    cert.write_bytes(renewed[0].read_bytes())
    key.write_bytes(renewed[1].read_bytes())
    await get_client(url, trusting(old_ca))
    async with KeepAliveLoad(url, concurrency=4, ssl_context=trusting(old_ca, new_ca)) as load:
        await load.wait_requests(100)
        c.signal(signal.SIGHUP)
        await c.wait_for("reload complete: 2 workers replaced")
        await load.wait_requests(100)
    assert load.result.failed == 0, load.result.errors[:5]
    await get_client(url, trusting(new_ca))
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await get_client(url, trusting(old_ca))
    assert await c.stop() == 0


async def test_run_takes_an_ssl_context(start_cluster: StartCluster, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = write_cert(ca, tmp_path)
    c = await start_cluster(
        sys.executable,
        "tls_run.py",
        env={"CERT": str(cert), "KEY": str(key), "AIOCLUSTER_BIND": "127.0.0.1:0"},
    )
    data = await get_client(f"https://{c.address}/client", trusting(ca))
    assert data["secure"] is True
    assert await c.stop() == 0


def bad_start(*args: str, cwd: Path = APPS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli("run", "client_app:app", "-b", "127.0.0.1:0", *args),
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
        check=False,
    )


def test_unusable_tls_files_are_one_line_and_exit_2(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = write_cert(ca, tmp_path)
    _, other_key = write_cert(ca, tmp_path, "other")
    unreadable = tmp_path / "garbage.pem"
    unreadable.write_text("not a certificate\n")
    cases = [
        (["--certfile", str(tmp_path / "missing.pem")], "cannot read the TLS certificate"),
        (["--certfile", str(cert), "--keyfile", str(tmp_path / "nokey")], "No such file"),
        (["--certfile", str(cert), "--keyfile", str(other_key)], "key values mismatch"),
        (["--certfile", str(unreadable), "--keyfile", str(key)], "not a PEM certificate"),
        (["--keyfile", str(key)], "keyfile need certfile"),
        (["--certfile", str(cert), "--cert-reqs", "required"], "needs ca_certs"),
    ]
    for args, why in cases:
        proc = bad_start(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("aiocluster: error: "), proc.stderr
        assert why in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr


async def test_run_refuses_ssl_context_with_certfile(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = write_cert(ca, tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "tls_run.py",
        cwd=APPS,
        env={
            "CERT": str(cert),
            "KEY": str(key),
            "AIOCLUSTER_CERTFILE": str(cert),
            "AIOCLUSTER_BIND": "127.0.0.1:0",
            "PATH": "/usr/bin:/bin",
        },
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert err.decode() == "aiocluster: error: give ssl_context or certfile, not both\n"


@pytest.mark.parametrize("spec", ["client_app:app", "asgi_app:app"])
async def test_a_handshake_under_way_when_the_drain_begins_is_answered(
    start_cluster: StartCluster, tmp_path: Path, spec: str
) -> None:
    """A connection the old worker accepted whose TLS handshake had not finished when its drain
    began is no connection of the application yet: the worker must give it the idle grace and
    answer it (``Connection: close``), not exit under it (the failed request a loaded machine
    showed in the certificate-rotation test)."""
    ca = trustme.CA()
    cert, key = write_cert(ca, tmp_path)
    c = await start_cluster(
        *cli(
            "run", spec, "-w", "1", "-b", "127.0.0.1:0", "--certfile", str(cert),
            "--keyfile", str(key), "--graceful-timeout", "10",
        )
    )  # fmt: skip
    assert (await get_client(f"https://{c.address}/client", trusting(ca)))["worker"] == 1
    reader, writer = await asyncio.open_connection(c.address.rsplit(":", 1)[0], c.port)
    try:
        async with asyncio.timeout(20):
            while await accepted_by_worker(c, 1) < 2:  # until the worker took the raw connection
                pass  # (each status call is a process: the loop paces itself)
            mark = len(c.lines)
            c.signal(signal.SIGHUP)
            await c.wait_for(
                r"\[worker 1 \d+\] INFO aiocluster.worker: asked to disconnect", start=mark
            )
            await writer.start_tls(trusting(ca), server_hostname="127.0.0.1")
            writer.write(b"GET /client HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = await reader.read()  # the worker closes the connection after its answer
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer
        assert b"connection: close" in head.lower(), head
        assert json.loads(body)["worker"] == 1, body
    finally:
        writer.close()
    assert await c.stop() == 0


async def accepted_by_worker(c: ClusterProcess, worker_id: int) -> int:
    """Connections worker ``worker_id`` has accepted, as ``aiocluster status --json`` says."""
    proc = await asyncio.create_subprocess_exec(
        *cli("status", "--json"), env=c.env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    workers = json.loads(out)["workers"]
    return int(next(w["accepted"] for w in workers if w["id"] == worker_id))
