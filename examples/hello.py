"""The example cluster: an aiohttp app served by every worker on one port.

python examples/hello.py            # 127.0.0.1:8080, one worker per CPU; cluster name "hello"
curl http://127.0.0.1:8080/         # answers with the worker that served it

Every option also comes from the environment, as for ``aiocluster run``: PORT=9000, or
AIOCLUSTER_BIND=127.0.0.1:9000, AIOCLUSTER_NAME=blue, AIOCLUSTER_WORKERS=2...
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


def port() -> int | None:
    """$PORT, else 8080; None when $AIOCLUSTER_BIND says where (an argument would win)."""
    if os.environ.get("AIOCLUSTER_BIND") and "PORT" not in os.environ:
        return None
    return int(os.environ.get("PORT", "8080"))


if __name__ == "__main__":
    aiocluster.run(make_app, port=port())
