"""A protocol app that imports nothing of aiohttp: it tells each client whether its worker has
aiohttp loaded all the same, so a test can check that serving a bare protocol never pays for it."""

from __future__ import annotations

import asyncio
import sys
import typing


class Loaded(asyncio.Protocol):
    """Writes one line, ``aiohttp=<True|False>``, and closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = typing.cast(asyncio.Transport, transport)
        writer.write(f"aiohttp={'aiohttp' in sys.modules}\n".encode())
        writer.close()
