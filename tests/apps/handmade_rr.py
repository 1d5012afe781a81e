"""A worker written by hand under policy rr: its own create_server, closed on stop, then
``wait_closed()``, which must wait for the connections it adopted to end (as asyncio's and
uvloop's servers do for the connections they accepted)."""

from __future__ import annotations

import asyncio
import sys

from webapp import EchoProtocol, say

import aiocluster


async def main(port: int) -> None:
    if aiocluster.is_primary():
        await aiocluster.supervise(workers=1, policy="rr", graceful_timeout=30)
        return
    server = await aiocluster.create_server(EchoProtocol, host="127.0.0.1", port=port)
    await aiocluster.until_stopped()
    server.close()
    say("server closed")
    await server.wait_closed()
    say("connections ended")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
