"""A worker whose loop turns are long still empties its accept queue (worker/backlog.py).

uvloop accepts one connection per loop turn. Here four requests that each block the worker's
loop for 50 ms are kept in flight, so a turn takes about 100 ms here; 60 new connections would
then need 60 turns (some 5 s) to be accepted one by one. They must all be answered within
2.5 s, over plain TCP and over TLS.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path

import aiohttp
import pytest
import trustme

from .conftest import StartCluster
from .harness import cli
from .test_policies import answer_raw, send_raw
from .test_tls_options import trusting, write_cert

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(sys.platform != "linux", reason="the fork start method"),
]


async def fetch(port: int, tls: ssl.SSLContext | None) -> dict[str, int]:
    """GET / on a new connection (a raw one: nothing retries); the connection may wait in the
    accept queue, and over TLS its handshake waits for the worker too."""
    return await answer_raw(await send_raw(port, tls=tls))


@pytest.mark.parametrize(
    ("policy", "tls"), [("shared", False), ("reuseport", False), ("shared", True)]
)
async def test_a_busy_worker_empties_its_accept_queue(
    start_cluster: StartCluster, tmp_path: Path, policy: str, tls: bool
) -> None:
    args = ["-w", "1", "-b", "127.0.0.1:0", "--policy", policy]
    client: ssl.SSLContext | None = None
    if tls:
        ca = trustme.CA()
        cert, key = write_cert(ca, tmp_path)
        args += ["--certfile", str(cert), "--keyfile", str(key)]
        client = trusting(ca)
    c = await start_cluster(*cli("run", "webapp:app", *args))
    base = f"{'https' if tls else 'http'}://127.0.0.1:{c.port}"
    stop = asyncio.Event()

    async def block_the_loop() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                async with session.get(f"{base}/block?s=0.05", ssl=client or False) as response:
                    assert response.status == 200

    blockers = [asyncio.create_task(block_the_loop()) for _ in range(4)]
    try:
        await c.wait_count("TEST block-started", 12)
        # Taken from the queue: well under a second here. One a turn: about 5 s.
        async with asyncio.timeout(2.5):
            answers = await asyncio.gather(*(fetch(c.port, client) for _ in range(60)))
        assert {answer["worker"] for answer in answers} == {1}
    finally:
        stop.set()
        await asyncio.gather(*blockers, return_exceptions=True)
    assert await c.stop() == 0
