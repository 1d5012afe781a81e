"""A worker written by hand that listens only once the test opens the gate ($GATE, a FIFO),
whatever the primary said meanwhile: it asks for its socket even after the cluster began to
stop, which a worker started just before a stop can do."""

from __future__ import annotations

import asyncio
import sys

from webapp import say, wait_for_gate

import aiocluster


async def main(port: int) -> None:
    if aiocluster.is_primary():
        await aiocluster.supervise(workers=1, graceful_timeout=5)
        return
    say("gate-waiting")
    await wait_for_gate()
    try:
        server = await aiocluster.create_server(asyncio.Protocol, host="127.0.0.1", port=port)
    except OSError as err:
        say(f"listen refused: {err}")
        return
    say("listening")
    server.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
