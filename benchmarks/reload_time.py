"""Rolling reload time of 8 workers under keep-alive load: aiocluster against gunicorn's HUP.

    python benchmarks/reload_time.py [--workers 8] [--rounds 3] [--policy shared]

Each round starts both servers (alternating which goes first), waits until N workers answer,
starts ``wrk -t1 -c64`` keep-alive load, sends SIGHUP one second later (aiocluster's SIGHUP is
the same ``Operations.reload()`` as ``aiocluster reload``) and measures the time until every
worker pid is new and the old ones are gone. wrk's socket errors plus non-2xx answers are the
failed requests. aiocluster runs from this checkout's venv, gunicorn from ``BENCH_VENV``
(``/work/venv-bench``). Stdlib only; Linux (/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
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
        self.proc = subprocess.Popen(argv, env=env, stdout=self.out, stderr=subprocess.STDOUT)

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


def parse_wrk(text: str) -> int:
    failed = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        failed += sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        failed += int(m.group(1))
    return failed


def one(kind: str, args: argparse.Namespace) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix=f"reload-{kind}-") as tmp:
        server = Server(kind, args.workers, args.policy, args.extra, Path(tmp))
        try:
            server.wait_ready(time.monotonic() + 60)
            before = server.worker_pids()
            wrk = subprocess.Popen(
                ["wrk", "-t1", "-c64", f"-d{args.duration}s", f"http://127.0.0.1:{server.port}/"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            time.sleep(1.0)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGHUP)
            took = float("nan")
            while time.monotonic() < signalled + args.duration:
                now = server.worker_pids()
                if not (now & before) and len(now) >= args.workers:
                    took = time.monotonic() - signalled
                    break
                time.sleep(0.01)
            out, _ = wrk.communicate(timeout=args.duration + 30)
            failed = parse_wrk(out)
            if failed:
                print(out, flush=True)
            return took, failed
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=12, help="seconds of wrk load")
    parser.add_argument("--policy", default="shared")
    parser.add_argument("--only", choices=["aiocluster", "gunicorn"])
    parser.add_argument("--extra", default="", help="more aiocluster run arguments")
    args = parser.parse_args()
    kinds = [args.only] if args.only else ["aiocluster", "gunicorn"]
    found: dict[str, list[tuple[float, int]]] = {k: [] for k in kinds}
    for number in range(args.rounds):
        for kind in kinds if number % 2 == 0 else kinds[::-1]:
            took, failed = one(kind, args)
            found[kind].append((took, failed))
            print(f"round {number + 1} {kind}: reload {took:.2f} s, {failed} failed", flush=True)
    for kind, rows in found.items():
        times = [t for t, _ in rows]
        print(
            f"{kind}: median {statistics.median(times):.2f} s "
            f"(spread {min(times):.2f}-{max(times):.2f}), failed {[f for _, f in rows]}"
        )
    if len(kinds) == 2:
        ratios = [a[0] / g[0] for a, g in zip(found["aiocluster"], found["gunicorn"], strict=True)]
        print(f"ratio aiocluster/gunicorn per round: {[round(r, 2) for r in ratios]}")


if __name__ == "__main__":
    main()
