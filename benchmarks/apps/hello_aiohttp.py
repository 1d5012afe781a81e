"""The aiohttp hello-world served by aiocluster and by gunicorn's aiohttp worker.

Every response carries ``X-Worker-Pid`` so the runner can tally which worker answered
(the balance figures); every server in the benchmark sends the same header.
"""

from __future__ import annotations

import os

from aiohttp import web

_HEADERS = {"X-Worker-Pid": str(os.getpid())}


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="Hello, World!", headers=_HEADERS)


def make_app() -> web.Application:
    application = web.Application()
    application.router.add_get("/", hello)
    return application


# Built at import: aiocluster workers and gunicorn workers each import this module afresh, after
# they start, so the pid above is the serving worker's own.
app = make_app()
