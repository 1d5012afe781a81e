"""Headless Chromium (the distribution's package) driven over the DevTools protocol with
aiohttp's websocket client: enough to load a page, evaluate expressions and take a screenshot."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

__all__ = ["Page", "chromium", "find_chromium"]

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1280,800",
)


def find_chromium() -> str | None:
    """The Chromium binary (Debian's package ``chromium``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One page target over its DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events in between are skipped)."""
        ident = next(self._ids)
        await self._ws.send_json({"id": ident, "method": method, "params": params})
        async for msg in self._ws:
            data = msg.json()
            if data.get("id") == ident:
                if "error" in data:
                    raise AssertionError(f"{method}: {data['error']}")
                result: dict[str, Any] = data["result"]
                return result
        raise AssertionError(f"{method}: the browser closed the connection")

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the page."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Evaluate ``expression`` until it is truthy (the page polls its own data)."""
        value = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not (value := await self.evaluate(expression)):
                    await asyncio.sleep(0.1)
        if not value:
            raise AssertionError(f"never true in the page: {expression}")
        return value

    async def screenshot(self) -> bytes:
        """The page as a PNG."""
        result = await self.call("Page.captureScreenshot", format="png")
        return base64.b64decode(result["data"])


@contextlib.asynccontextmanager
async def chromium(binary: str, url: str) -> AsyncIterator[Page]:
    """Chromium showing ``url``; stopped and reaped at the end."""
    profile = tempfile.mkdtemp(prefix="aiocluster-chromium-")
    proc = await asyncio.create_subprocess_exec(
        binary,
        *FLAGS,
        f"--user-data-dir={profile}",
        url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        port = None
        async with asyncio.timeout(30):
            while port is None:
                line = (await proc.stderr.readline()).decode(errors="replace")
                if not line:
                    raise AssertionError("chromium exited before it listened for DevTools")
                if m := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                    port = int(m.group(1))
        # Keep reading its stderr so that it never blocks on a full pipe.
        drain = asyncio.ensure_future(proc.stderr.read())
        async with aiohttp.ClientSession() as s:
            async with asyncio.timeout(10):
                while True:
                    async with s.get(f"http://127.0.0.1:{port}/json/list") as r:
                        pages = [t for t in await r.json() if t["type"] == "page"]
                    if pages:
                        break
                    await asyncio.sleep(0.1)
            async with s.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield Page(ws)
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
