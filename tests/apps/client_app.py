"""What a worker believes of its client (``/client``), and a factory that takes arguments.

``aiocluster run client_app:app`` serves it as is; ``client_app:make_app("hi", debug=True)``
builds it with a greeting, as gunicorn's ``module:create_app(...)`` does.
"""

from __future__ import annotations

from aiohttp import web

import aiocluster

GREETING = web.AppKey("greeting", str)
DEBUG = web.AppKey("debug", bool)


async def client(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "remote": request.remote,
            "scheme": request.scheme,
            "secure": request.secure,
            "host": request.host,
            "worker": aiocluster.worker_id(),
            "greeting": request.app[GREETING],
            "debug": request.app[DEBUG],
            "peer_cert": bool(request.transport and request.transport.get_extra_info("peercert")),
        }
    )


def make_app(greeting: str = "hello", *, debug: bool = False) -> web.Application:
    app = web.Application()
    app[GREETING] = greeting
    app[DEBUG] = debug
    app.router.add_get("/client", client)
    return app


app = make_app()
