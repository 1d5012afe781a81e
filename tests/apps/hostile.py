"""A cluster whose workers misbehave on their control channel when asked (``GET /inject?kind=K``).

Run as ``python hostile.py [WORKERS [TIMEOUT]]``. The worker writes the bytes (and descriptors) of
kind K straight onto its channel socket, bypassing the channel's own framing, so the primary sees
exactly what a buggy or compromised worker could send. Each kind first prints
``TEST inject kind=K worker=N pid=P`` for the tests to wait on.
"""

from __future__ import annotations

import array
import asyncio
import os
import random
import socket
import sys
import tempfile
from collections.abc import Callable

from aiohttp import web

import aiocluster
from aiocluster.web import ClusterSite
from aiocluster.wire.codec import HEADER, encode
from aiocluster.worker.link import link

TCP = {"kind": "tcp", "host": "127.0.0.1", "port": 0}
# Seeded: the first header of these bytes announces descriptors (and far more than 1 MiB).
RANDOM_BYTES = random.Random(20240601).randbytes(64)


def say(line: str) -> None:
    # One write for the whole line (print() writes the newline separately).
    sys.stderr.write(f"TEST {line} worker={aiocluster.worker_id()} pid={os.getpid()}\n")


def raw(payload: bytes, nfds: int = 0) -> bytes:
    return HEADER.pack(len(payload), nfds) + payload


def frame(msg: dict[str, object], nfds: int = 0) -> bytes:
    return encode({"seq": 10**6, **msg}, nfds)


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def many_pipe_ends(sock: socket.socket) -> None:
    fds: list[int] = []
    for _ in range(20):
        fds.extend(os.pipe())
    try:
        send_with_fds(sock, frame({"act": "heartbeat"}), fds)  # 40 descriptors, none announced
    finally:
        for fd in fds:
            os.close(fd)


def regular_file(sock: socket.socket) -> None:
    with tempfile.TemporaryFile() as f:
        send_with_fds(sock, frame({"act": "message", "data": 1}, 1), [f.fileno()])


def a_socket(sock: socket.socket) -> None:
    with socket.socket() as s:
        send_with_fds(sock, frame({"act": "message", "data": 1}, 1), [s.fileno()])


def no_reading(sock: socket.socket) -> None:
    asyncio.get_running_loop().remove_reader(sock.fileno())


def query_without_reading(sock: socket.socket, count: int) -> None:
    no_reading(sock)
    request = frame({"act": "queryServer", "address": TCP, "index": 0, "backlog": 16})
    sock.settimeout(10)  # the primary reads at its own pace: block (briefly) when it lags
    try:
        for _ in range(count):
            sock.sendall(request)
    except OSError:
        return  # cut off meanwhile
    finally:
        sock.setblocking(False)
    # Behind the requests on the same stream: once the primary reports it, it has answered them.
    aiocluster.send({"after": "queryServer"})


def flood_me(sock: socket.socket) -> None:
    # Stop reading, then ask the primary (its on_primary hook) to send us 20 MiB.
    no_reading(sock)
    aiocluster.send({"flood": 320})


def send_blocking(sock: socket.socket, data: bytes) -> None:
    # More than the socket buffer: block (briefly) while the primary reads.
    sock.settimeout(10)
    try:
        sock.sendall(data)
    except OSError:
        pass  # cut off meanwhile
    finally:
        sock.setblocking(False)


def metrics(families: object) -> bytes:
    return frame({"act": "metrics", "families": families})


def counter(name: str, samples: list[list[object]]) -> dict[str, object]:
    return {"name": name, "type": "counter", "help": "h", "samples": samples}


def metrics_flood(sock: socket.socket) -> None:
    # Far more reports than a heartbeat's pace allows, all valid.
    send_blocking(sock, metrics([counter("x", [["x_total", {}, 1]])]) * 200)


def metrics_churn(sock: socket.socket) -> None:
    """15 reports (within the rate's burst) of 9000 series each, every one a new label value:
    the primary keeps only the last report, never their union."""
    for round_ in range(15):
        samples = [["churn_total", {"id": f"{round_}-{i}"}, 1] for i in range(9000)]
        link().channel.send({"act": "metrics", "families": [counter("churn", samples)]})
    # Behind the reports on the same stream: once the primary says it got this, it read them.
    aiocluster.send({"after": "metrics-churn"})


KINDS: dict[str, Callable[[socket.socket], None]] = {
    "random-bytes": lambda s: s.sendall(RANDOM_BYTES),
    "length-4gib": lambda s: s.sendall(HEADER.pack(0xFFFFFFFF, 0)),
    "bad-utf8": lambda s: s.sendall(raw(b'{"act":"\xff\xfe"}')),
    "json-array": lambda s: s.sendall(raw(b"[1,2]")),
    "json-string": lambda s: s.sendall(raw(b'"x"')),
    "json-null": lambda s: s.sendall(raw(b"null")),
    "no-act": lambda s: s.sendall(raw(b'{"seq":1}')),
    "unknown-act": lambda s: s.sendall(frame({"act": "selfDestruct"})),
    "primary-only-act": lambda s: s.sendall(frame({"act": "disconnect"})),
    "ack-to-nothing": lambda s: s.sendall(frame({"act": "queryServer", "ack": 10**9})),
    "online-twice": lambda s: s.sendall(frame({"act": "online", "pid": os.getpid()})),
    "query-index-string": lambda s: s.sendall(
        frame({"act": "queryServer", "address": TCP, "index": "x"})
    ),
    "query-address-string": lambda s: s.sendall(
        frame({"act": "queryServer", "address": "127.0.0.1:80", "index": 0})
    ),
    "listening-no-address": lambda s: s.sendall(frame({"act": "listening"})),
    "heartbeat-string": lambda s: s.sendall(frame({"act": "heartbeat", "rss": "lots"})),
    "heartbeat-1e999": lambda s: s.sendall(raw(b'{"act":"heartbeat","rss":1e999}')),
    "heartbeat-huge-int": lambda s: s.sendall(
        raw(b'{"act":"heartbeat","rss":' + b"9" * 400 + b"}")
    ),
    "metrics-not-a-list": lambda s: s.sendall(metrics({"x": 1})),
    "metrics-bad-name": lambda s: s.sendall(metrics([counter("no spaces", [])])),
    "metrics-own-name": lambda s: s.sendall(metrics([counter("aiocluster_requests", [])])),
    "metrics-too-many-series": lambda s: send_blocking(
        s,
        metrics([counter("x", [["x_total", {"i": str(i)}, 1] for i in range(10_001)])]),
    ),
    "metrics-string-value": lambda s: s.sendall(metrics([counter("x", [["x_total", {}, "1"]])])),
    "metrics-flood": metrics_flood,
    "metrics-churn": metrics_churn,
    "many-fds-none-announced": many_pipe_ends,
    "fd-of-regular-file": regular_file,
    "fd-of-socket": a_socket,
    "fds-announced-none-sent": lambda s: s.sendall(frame({"act": "message"}, 2)),
    "query-once-without-reading": lambda s: query_without_reading(s, 1),
    "query-many-without-reading": lambda s: query_without_reading(s, 2000),
    "stop-reading-and-flood": flood_me,
}


async def inject(request: web.Request) -> web.Response:
    kind = request.query["kind"]
    say(f"inject kind={kind}")
    # A second socket object on the channel's own descriptor, let go of (not closed) after.
    raw_channel = socket.socket(fileno=link().channel.fileno())
    try:
        KINDS[kind](raw_channel)
    finally:
        raw_channel.detach()
    return web.json_response({"worker": aiocluster.worker_id(), "pid": os.getpid()})


async def whoami(request: web.Request) -> web.Response:
    return web.json_response({"worker": aiocluster.worker_id(), "pid": os.getpid()})


async def listen_cycle(request: web.Request) -> web.Response:
    """Listen on a fresh port 0 and close it, ``n`` times, the way ``how`` says."""
    n = int(request.query.get("n", "20"))
    how = request.query.get("how", "site")
    for _ in range(n):
        if how == "site":
            runner = web.AppRunner(web.Application(), handle_signals=False)
            await runner.setup()
            site = ClusterSite(runner, "127.0.0.1", 0)
            await site.start()
            await runner.cleanup()  # stops the site, which tells the primary
        else:
            server = await aiocluster.create_server(asyncio.Protocol, "127.0.0.1", 0)
            server.close()
            await server.wait_closed()
    say(f"listen-cycle done how={how} n={n}")
    return web.json_response({"worker": aiocluster.worker_id(), "pid": os.getpid()})


async def listen_host(request: web.Request) -> web.Response:
    """``create_server`` on ``host`` port 0: the real address, or the error the primary gave."""
    try:
        server = await aiocluster.create_server(asyncio.Protocol, request.query["host"], 0)
    except OSError as err:
        return web.json_response({"errno": err.errno, "error": str(err)})
    sockets: list[socket.socket] = list(getattr(server, "sockets", []))  # uvloop's Server too
    sockname = sockets[0].getsockname()
    server.close()
    await server.wait_closed()
    return web.json_response({"errno": 0, "sockname": list(sockname)})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", whoami)
    app.router.add_get("/inject", inject)
    app.router.add_get("/listen-cycle", listen_cycle)
    app.router.add_get("/listen-host", listen_host)
    return app


def on_primary(cluster: aiocluster.Cluster) -> None:
    def on_message(worker: aiocluster.Worker, data: object) -> None:
        if isinstance(data, dict) and isinstance(data.get("flood"), int):
            chunk = "x" * 65536
            sent = 0
            try:
                for _ in range(data["flood"]):
                    worker.send(chunk)
                    sent += 1
            except aiocluster.ChannelClosed:
                pass
            sys.stderr.write(f"TEST flood sent={sent} of {data['flood']}" + "\n")
        else:
            sys.stderr.write(f"TEST primary got {data} from worker={worker.id}" + "\n")

    cluster.on("message", on_message)


def main() -> None:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 30.0
    aiocluster.run(
        make_app,
        host="127.0.0.1",
        port=0,
        workers=workers,
        timeout=timeout,
        graceful_timeout=5,
        on_primary=on_primary,
        admin=os.environ.get("ADMIN"),
    )


if __name__ == "__main__":
    main()
