"""A worker whose loop turns are long still empties its accept queue (worker/backlog.py).

uvloop accepts one connection per loop turn. Here four requests that each block the worker's
loop for 50 ms are kept in flight, so a turn takes about 100 ms here; 60 new connections would
then need 60 turns (some 5 s) to be accepted one by one. They must all be answered within
2.5 s.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import pytest

from .conftest import StartCluster
from .harness import cli
from .test_policies import answer_raw, send_raw

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(sys.platform != "linux", reason="the fork start method"),
]


@pytest.mark.parametrize("policy", ["shared", "reuseport"])
async def test_a_busy_worker_empties_its_accept_queue(
    start_cluster: StartCluster, policy: str
) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--policy", policy)
    )
    stop = asyncio.Event()

    async def block_the_loop() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                async with session.get(f"{c.url}/block?s=0.05") as response:
                    assert response.status == 200

    blockers = [asyncio.create_task(block_the_loop()) for _ in range(4)]
    try:
        await c.wait_count("TEST block-started", 12)
        clients = [await send_raw(c.port) for _ in range(60)]
        # Taken from the queue: well under a second here. One a turn: about 5 s.
        async with asyncio.timeout(2.5):
            answers = await asyncio.gather(*(answer_raw(client) for client in clients))
        assert {answer["worker"] for answer in answers} == {1}
    finally:
        stop.set()
        await asyncio.gather(*blockers, return_exceptions=True)
    assert await c.stop() == 0
