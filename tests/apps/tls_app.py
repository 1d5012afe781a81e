"""TLS under every policy: an aiohttp site (ClusterSite with ssl_context) and a protocol server
(create_server with ssl=) in each worker. Certificate and key come from $CERT and $KEY."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys

from aiohttp import web
from webapp import EchoProtocol, make_app, say

import aiocluster
from aiocluster.web import ClusterSite


async def main(site_port: int, echo_port: int, policy: str) -> None:
    if aiocluster.is_primary():
        await aiocluster.supervise(workers=2, graceful_timeout=5, policy=policy)
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.environ["CERT"], os.environ["KEY"])
    runner = web.AppRunner(make_app())
    await runner.setup()
    await ClusterSite(runner, "127.0.0.1", site_port, ssl_context=context).start()
    echo = await aiocluster.create_server(EchoProtocol, "127.0.0.1", echo_port, ssl=context)
    say("tls-ready")
    await aiocluster.until_stopped()
    echo.close()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
