"""Serving by hand: the user's own AppRunner with ClusterSite in workers, supervise() above."""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web
from webapp import make_app

import aiocluster
from aiocluster.web import ClusterSite


async def main(port: int) -> None:
    if aiocluster.is_primary():
        await aiocluster.supervise(workers=2, graceful_timeout=5)
        return
    runner = web.AppRunner(make_app())
    await runner.setup()
    site = ClusterSite(runner, "127.0.0.1", port)
    await site.start()
    sys.stderr.write(f"TEST custom-site {site.name}" + "\n")
    await aiocluster.until_stopped()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
