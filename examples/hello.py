"""The example cluster: an aiohttp app served by every worker on one port.

python examples/hello.py            # 127.0.0.1:8080, one worker per CPU
curl http://127.0.0.1:8080/         # answers with the worker that served it
"""

import os

from aiohttp import web

import aiocluster


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=f"Hello from worker {aiocluster.worker_id()} (pid {os.getpid()})\n")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", hello)
    return app


if __name__ == "__main__":
    aiocluster.run(make_app, port=int(os.environ.get("PORT", "8080")))
