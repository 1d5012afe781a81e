"""TLS in workers, under each policy: the handshake happens in the worker that serves, also when
the primary accepted the connection and handed it over (policy rr)."""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path

import aiohttp
import pytest
import trustme

from .conftest import StartCluster
from .test_cluster import free_port


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize("policy", ["shared", "rr", "reuseport"])
async def test_tls_sites_and_protocol_servers(
    start_cluster: StartCluster, ca: trustme.CA, tmp_path: Path, policy: str
) -> None:
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    site_port, echo_port = free_port(), free_port()
    c = await start_cluster(
        sys.executable,
        "tls_app.py",
        str(site_port),
        str(echo_port),
        policy,
        env={"CERT": str(cert_path), "KEY": str(key_path)},
    )
    await c.wait_count("TEST tls-ready", 2)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    workers = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(6):
            async with s.get(f"https://127.0.0.1:{site_port}/", ssl=client) as r:
                assert r.status == 200
                workers.add((await r.json())["worker"])
    if policy == "rr":
        assert workers == {1, 2}  # strict rotation over the two workers
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", echo_port, ssl=client)
        try:
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"worker ")
            writer.write(b"secret\n")
            assert await asyncio.wait_for(reader.readline(), 10) == b"secret\n"
        finally:
            writer.close()
    # A client that does not trust the certificate is refused by the worker's handshake.
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"https://127.0.0.1:{site_port}/", ssl=ssl.create_default_context()),
        ):
            pass
    assert await c.stop() == 0
    assert "Traceback" not in c.output
