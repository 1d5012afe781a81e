"""What benchmarks/reload_time.py and benchmarks/burst.py share: starting aiocluster (from this
checkout's venv) and gunicorn (from ``BENCH_VENV``) side by side, their worker pids, wrk's output.

Stdlib only; Linux (/proc).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"
BENCH_VENV = Path(os.environ.get("BENCH_VENV", "/work/venv-bench"))
OWN_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the task ended meanwhile
            found.update(int(c) for c in (task / "children").read_text().split())
    return found


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


class Server:
    """aiocluster (``kind`` "aiocluster") or gunicorn's aiohttp worker serving the hello app."""

    def __init__(self, kind: str, workers: int, policy: str, extra: str, tmp: Path) -> None:
        self.kind = kind
        self.workers = workers
        self.port = free_port()
        self.log = tmp / f"{kind}.log"
        env = dict(os.environ, PYTHONPATH=str(APPS))
        if kind == "aiocluster":
            argv = [str(OWN_BIN / "aiocluster"), "run", "hello_aiohttp:app", "-w", str(workers)]
            argv += ["-b", f"127.0.0.1:{self.port}", "--control", str(tmp / "ctl.sock")]
            argv += ["--policy", policy, *extra.split()]
        else:
            argv = [str(BENCH_VENV / "bin" / "gunicorn"), "-k", "aiohttp.GunicornUVLoopWebWorker"]
            argv += ["-w", str(workers), "-b", f"127.0.0.1:{self.port}", "hello_aiohttp:app"]
        self.out = self.log.open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, cwd=tmp, stdout=self.out, stderr=subprocess.STDOUT
        )

    def zygotes(self) -> set[int]:
        text = self.log.read_bytes()
        return {int(m) for m in re.findall(rb"zygote \(pid (\d+)\)", text)}

    def worker_pids(self) -> set[int]:
        return children(self.proc.pid) - self.zygotes()

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            ready = self.kind == "gunicorn" or b"ready:" in self.log.read_bytes()
            if ready and len(self.worker_pids()) == self.workers and answers(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} did not start; see {self.log}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()


def wrk_json(text: str) -> dict[str, object]:
    """The ``BENCH_JSON`` line that ``-s keepalive.lua`` / ``close.lua`` print (wrk_report.lua)."""
    for line in text.splitlines():
        if line.startswith("BENCH_JSON "):
            return dict(json.loads(line.removeprefix("BENCH_JSON ")))
    raise RuntimeError(f"wrk printed no BENCH_JSON line:\n{text[-2000:]}")


def failed_requests(text: str) -> int:
    """wrk's socket errors plus its non-2xx answers, from its plain output."""
    failed = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        failed += sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        failed += int(m.group(1))
    return failed
