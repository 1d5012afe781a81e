"""CPU per request of a server: the primary's share and the workers', side by side.

Made for policy rr (the primary's accept-and-hand-off against the workers' adoption), and as
the A/B of aiocluster against gunicorn with the same aiohttp app:

    python benchmarks/cpu_cost.py                               # this checkout, 3 rounds
    python benchmarks/cpu_cost.py --baseline /tmp/main-copy     # A (baseline) vs B (this tree)
    python benchmarks/cpu_cost.py --baseline A --tree B --rounds 5 --duration 5
    python benchmarks/cpu_cost.py --node                        # + N: Node's cluster, SCHED_RR
    python benchmarks/cpu_cost.py --policy shared --app hello_aiohttp:app --gunicorn
    python benchmarks/cpu_cost.py --policy shared --app hello_aiohttp:app --gunicorn --keepalive

Each side is a checkout of aiocluster (a folder holding the ``aiocluster`` package). For each
side one server is started,

    python -m aiocluster run bare_protocol:HelloProtocol --protocol -w 2 --policy rr \\
        --bind 127.0.0.1:PORT --control off

(``--app`` and ``--policy`` change the app and the policy) with ``PYTHONPATH`` = that checkout
and ``benchmarks/apps`` (so the primary and the workers import that side's package), and the
same interpreter for both (``--python``, default: this one; it needs aiohttp and uvloop, and
gunicorn for ``--gunicorn``). Once all serve, the load runs interleaved, A B A B ...,
``--rounds`` times: a 1 s warmup, then

    wrk -t1 -c64 -dDURATIONs -H "Connection: close" http://127.0.0.1:PORT/

so every request is a new connection (``--keepalive`` drops the header: requests on 64 open
connections). Around each measured run the CPU seconds (user + system, from
``/proc/PID/stat``) of the primary and of each worker are read; the figures are

- primary us/req: the primary's CPU over the requests wrk completed,
- worker us/req: all the workers' CPU over the same count (the primary's children: its
  workers, and under start method fork the zygote, idle meanwhile),
- req/s as wrk reports it, and wrk's socket errors and non-2xx answers (should be 0).

``--node`` adds side N, Node's own cluster under SCHED_RR (``apps/node_cluster.js``, the
classic hello world). ``--gunicorn`` adds side G: ``gunicorn -k
aiohttp.GunicornUVLoopWebWorker`` serving the same ``--app`` (an aiohttp app); its master is
the "primary". The medians per side are printed at the end, with B/A, B/N and B/G. This
machine's speed drifts by 20-50 % from one minute to the next: compare CPU per request (which
drifts much less) rather than req/s, and only between sides of one interleaved run.

Only 127.0.0.1 is used. Every wrk run is bounded by ``-d`` (and a timeout on top). Every server
is stopped (SIGTERM to the primary, which stops its workers; SIGKILL to whatever is left after
15 s) and the primary reaped, on errors, Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"
HOST = "127.0.0.1"  # never anything else
NODE = shutil.which("node") or "/usr/bin/node"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid``; 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Sample:
    primary_us: float
    worker_us: float
    rps: float
    requests: int
    errors: int


class Server:
    """One side's cluster: started at once, stopped (and reaped) by :meth:`stop`."""

    def __init__(
        self, label: str, checkout: Path | None, args: argparse.Namespace, tmp: Path
    ) -> None:
        """An aiocluster checkout; with ``checkout`` None, the peer ``label`` names (N, G)."""
        self.label = label
        self.port = free_port()
        self.log_path = tmp / f"{label}.log"
        self._log = self.log_path.open("wb")
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.peer = checkout is None
        if label == "N":
            env.update(PORT=str(self.port), WORKERS=str(args.workers), BENCH_SCHED="rr")
            argv = [NODE, str(APPS / "node_cluster.js")]
        elif label == "G":
            env["PYTHONPATH"] = str(APPS)
            argv = [
                args.python,
                "-m",
                "gunicorn",
                "-k",
                "aiohttp.GunicornUVLoopWebWorker",
                "-w",
                str(args.workers),
                "-b",
                f"{HOST}:{self.port}",
                args.app.split()[0],
            ]
        else:
            assert checkout is not None
            env["PYTHONPATH"] = os.pathsep.join([str(checkout), str(APPS)])
            argv = [
                args.python,
                "-m",
                "aiocluster",
                "run",
                *args.app.split(),
                "-w",
                str(args.workers),
                "--policy",
                args.policy,
                *args.server_args.split(),
                "--bind",
                f"{HOST}:{self.port}",
                "--control",
                "off",
            ]
        self.proc = subprocess.Popen(
            argv,
            cwd=APPS,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers: list[int] = []

    def wait_ready(self, workers: int, timeout: float = 60) -> None:
        """Until the primary logs ``ready:`` and has its workers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited ({self.proc.returncode}):\n{self.tail()}")
            self.workers = children(self.proc.pid)
            if len(self.workers) >= workers and self._answers():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.label} not ready after {timeout}s:\n{self.tail()}")

    def _answers(self) -> bool:
        if not self.peer:
            # The primary logs `ready: N workers listening` once every worker listens.
            return b"ready:" in self.log_path.read_bytes()
        try:
            with socket.create_connection((HOST, self.port), timeout=2) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def cpu(self) -> tuple[float, float]:
        """CPU seconds of the primary, and of all the workers together."""
        return cpu_s(self.proc.pid), sum(cpu_s(w) for w in self.workers)

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])

    def stop(self) -> None:
        seen = set(self.workers)
        if self.proc.poll() is None:
            seen.update(children(self.proc.pid))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        # Workers run in sessions of their own: their primary stops them; make sure it did.
        deadline = time.monotonic() + 5
        for pid in seen:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                if _is_zombie(pid):
                    break
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                if not _is_zombie(pid) and Path(f"/proc/{pid}").exists():
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


def _is_zombie(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rindex(")") + 2] == "Z"


def wrk(port: int, seconds: int, connections: int, keepalive: bool) -> tuple[float, int, int]:
    """One bounded wrk run: (req/s, requests, socket errors + non-2xx)."""
    close = [] if keepalive else ["-H", "Connection: close"]
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        *close,
        f"http://{HOST}:{port}/",
    ]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 30, check=False
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    done = re.search(r"(\d+) requests in", out)
    if rps is None or done is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    return float(rps.group(1)), int(done.group(1)), errors


def measure(server: Server, args: argparse.Namespace) -> Sample:
    # Warmup: new workers' first requests, caches.
    wrk(server.port, 1, args.connections, args.keepalive)
    primary0, workers0 = server.cpu()
    rps, requests, errors = wrk(server.port, args.duration, args.connections, args.keepalive)
    primary1, workers1 = server.cpu()
    n = max(1, requests)
    return Sample(
        (primary1 - primary0) * 1e6 / n, (workers1 - workers0) * 1e6 / n, rps, requests, errors
    )


@contextlib.contextmanager
def servers(
    sides: list[tuple[str, Path | None]], args: argparse.Namespace
) -> Iterator[list[Server]]:
    started: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="rr-cost-") as tmp:
        try:
            for label, checkout in sides:
                started.append(Server(label, checkout, args, Path(tmp)))
            for server in started:
                server.wait_ready(args.workers)
            yield started
        finally:
            for server in started:
                server.stop()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="checkout A (e.g. a copy of main)")
    parser.add_argument("--tree", type=Path, default=HERE.parent, help="checkout B (this one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--python", default=sys.executable, help="interpreter for the servers")
    parser.add_argument(
        "--app", default="bare_protocol:HelloProtocol --protocol", help="app spec and flags"
    )
    parser.add_argument("--policy", default="rr", help="aiocluster's policy (rr)")
    parser.add_argument("--server-args", default="", help="more `aiocluster run` options")
    parser.add_argument(
        "--keepalive", action="store_true", help="keep-alive load, not a connection per request"
    )
    parser.add_argument(
        "--gunicorn",
        action="store_true",
        help="also side G: gunicorn with aiohttp's GunicornUVLoopWebWorker, the same --app",
    )
    parser.add_argument(
        "--node", action="store_true", help="also side N: Node's cluster, SCHED_RR (reference)"
    )
    args = parser.parse_args()
    sides: list[tuple[str, Path | None]] = [("B", args.tree.resolve())]
    if args.baseline is not None:
        sides.insert(0, ("A", args.baseline.resolve()))
    for label, path in list(sides):
        assert path is not None
        if not (path / "aiocluster" / "__init__.py").exists():
            parser.error(f"{label}: {path} holds no aiocluster package")
        print(f"{label}: {path}")
    if args.node:
        if not Path(NODE).exists():
            parser.error(f"--node: {NODE} not found")
        sides.append(("N", None))
        print(f"N: {NODE} {APPS / 'node_cluster.js'} (BENCH_SCHED=rr)")
    if args.gunicorn:
        if "--protocol" in args.app.split():
            parser.error("--gunicorn serves an aiohttp app: give one with --app")
        sides.append(("G", None))
        print(f"G: gunicorn -k aiohttp.GunicornUVLoopWebWorker {args.app.split()[0]}")
    signal.signal(signal.SIGTERM, _interrupt)
    results: dict[str, list[Sample]] = {label: [] for label, _ in sides}
    header = f"{'round':>5} {'side':>4} {'primary us/req':>16} {'worker us/req':>15}"
    print(f"{header} {'req/s':>9} {'requests':>9} {'errors':>6}", flush=True)
    with servers(sides, args) as running:
        for round_ in range(1, args.rounds + 1):
            for server in running:
                s = measure(server, args)
                results[server.label].append(s)
                print(
                    f"{round_:>5} {server.label:>4} {s.primary_us:>16.1f} {s.worker_us:>15.1f} "
                    f"{s.rps:>9.0f} {s.requests:>9} {s.errors:>6}",
                    flush=True,
                )
    print("median:")
    medians: dict[str, tuple[float, float, float]] = {}
    for label, samples in results.items():
        medians[label] = (
            statistics.median(s.primary_us for s in samples),
            statistics.median(s.worker_us for s in samples),
            statistics.median(s.rps for s in samples),
        )
        p, w, r = medians[label]
        print(f"{'':>5} {label:>4} {p:>16.1f} {w:>15.1f} {r:>9.0f}")
    for top, bottom in (("B", "A"), ("B", "N"), ("B", "G")):
        if top in medians and bottom in medians:
            (pt, wt, rt), (pb, wb, rb) = medians[top], medians[bottom]
            ratio = f"{top}/{bottom}"
            primary = f"{pt / pb:.2f}" if pb else "-"  # gunicorn's master: no CPU per request
            print(f"{'':>5} {ratio:>4} {primary:>16} {wt / wb:>15.2f} {rt / rb:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
