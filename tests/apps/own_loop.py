"""A program that awaits aiocluster.serve() in its own event loop, asking for start 'fork'."""

from __future__ import annotations

import asyncio
import sys

from webapp import make_app

import aiocluster


async def main() -> None:
    await aiocluster.serve(make_app, port=int(sys.argv[1]), workers=2, start="fork")


if __name__ == "__main__":
    asyncio.run(main())
