"""The aiohttp hello-world served by aiocluster and by gunicorn's aiohttp worker.

Every response carries ``X-Worker-Pid`` so the runner can tally which worker answered
(the balance figures); every server in the benchmark sends the same header.
"""

from __future__ import annotations

import os

from aiohttp import web

_HEADERS = {"X-Worker-Pid": str(os.getpid())}
# A worker forked after this import (aiocluster's fork start method forks its workers from a
# zygote that imported the app) must not answer with its parent's pid.
os.register_at_fork(after_in_child=lambda: _HEADERS.update({"X-Worker-Pid": str(os.getpid())}))


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="Hello, World!", headers=_HEADERS)


def make_app() -> web.Application:
    application = web.Application()
    application.router.add_get("/", hello)
    return application


# Built at import: gunicorn workers, and aiocluster workers started as fresh interpreters,
# import this module after they start; forked ones update the pid above after the fork.
app = make_app()
