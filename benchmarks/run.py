"""Benchmark runner: aiocluster against its peers, on loopback, driven by wrk.

    python benchmarks/run.py --setup        # make /work/venv-bench, install wrk and nginx
    python benchmarks/run.py --quick        # a few minutes
    python benchmarks/run.py                # the full run
    python benchmarks/run.py --list         # the server table, and what would be skipped

First every server is started once untimed (a warm-up start: the page cache), then started
and timed to its first answer in a few passes over all servers. Then come rounds over all
servers, in an order that puts each aiocluster row beside the peer it is compared with,
reversed every other round: each server is started on a free loopback port, warmed up (that
warmup also tallies which worker answered, for the balance figures), measured with keep-alive
and with connection-per-request, its memory read, reloaded under load (every round), then
stopped, before the next one starts. Results go to ``benchmarks/results/`` as JSON, with
each round's figures kept, and ``report.py`` turns them into a Markdown table and a PNG chart;
it takes each target ratio within a round, where the machine's drift weighs on both sides.

Only 127.0.0.1 is ever used. Every load run is bounded by ``wrk -d``, and every server started
is stopped and reaped, on errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fnmatch
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
APPS = HERE / "apps"
VENV = Path(os.environ.get("BENCH_VENV", "/work/venv-bench"))
HOST = "127.0.0.1"  # never anything else
NODE = shutil.which("node") or "/usr/bin/node"

MODES = ("keepalive", "close")
LUA = {"keepalive": HERE / "keepalive.lua", "close": HERE / "close.lua"}
POLICY_DEFAULTS = ("rr", "reuseport")
#: --quick's measured seconds per mode and round: 3 rounds of (1 s warmup + this) per mode.
QUICK_DURATION = 2.0


# -- settings ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    workers: int
    duration: float
    warmup: float
    connections: int
    wrk_threads: int
    starts: int
    reload_duration: float
    reloads: bool
    rounds: int
    quiet_cores: float
    quiet_wait: float
    quick: bool
    out: Path


@dataclasses.dataclass(frozen=True)
class Context:
    """What a server's command line may depend on."""

    port: int
    workers: int
    tmp: Path

    def bin(self, name: str) -> str:
        return str(VENV / "bin" / name)


# -- the server table ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Server:
    """One row of the benchmark: how to start it and what it is compared with."""

    name: str
    family: str  # "aiocluster", "peer" or "ceiling"
    describe: str
    argv: Callable[[Context], list[str]]
    env: Callable[[Context], dict[str, str]] = lambda ctx: {}
    #: Writes config files into ctx.tmp before the start, if the server needs any.
    prepare: Callable[[Context], None] | None = None
    #: Returns why the row cannot run here (a missing program), or None.
    missing: Callable[[], str | None] = lambda: None
    #: The signal that makes the server reload its workers gracefully, if it has one.
    reload_signal: signal.Signals | None = None
    reload_note: str = ""


def _need(path: str, how: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if shutil.which(path) or Path(path).exists() else f"{path} not found: {how}"

    return check


def _need_venv(name: str) -> Callable[[], str | None]:
    return _need(str(VENV / "bin" / name), "run `python benchmarks/run.py --setup`")


# aiocluster reloads on SIGHUP (rolling: each new worker listens before the old one drains);
# `measure_reload` counts the requests that fail meanwhile, as for the peers.
AIOCLUSTER_RELOAD: signal.Signals | None = signal.SIGHUP
AIOCLUSTER_RELOAD_NOTE = ""


def aiocluster_help() -> tuple[str, str]:
    """What ``aiocluster run --help`` prints, or "" and why it could not be run."""
    exe = VENV / "bin" / "aiocluster"
    try:
        text = subprocess.run(
            [str(exe), "run", "--help"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return "", f"cannot run `aiocluster run --help` ({err})"
    return text, ""


def aiocluster_policies(text: str) -> tuple[list[str], str]:
    """The ``--policy`` choices ``aiocluster run --help`` lists (besides the default), or a note."""
    if "--policy" not in text:
        return [], "policy rows skipped: `aiocluster run --help` lists no --policy yet"
    found = re.search(r"--policy\s+\{([^}]*)\}", text)
    choices = [c.strip() for c in found.group(1).split(",")] if found else list(POLICY_DEFAULTS)
    # The default as the option's own help states it: "(default: shared) [env: AIOCLUSTER_POLICY]".
    default = re.search(r"\(default:\s*([\w-]+)\)\s*\[env:\s*AIOCLUSTER_POLICY\]", text)
    if default and default.group(1) in choices:
        choices.remove(default.group(1))  # the rows without --policy already measure it
    return choices, ""


def aiocluster_start_methods(text: str) -> tuple[list[str], str]:
    """The ``--start`` methods ``aiocluster run --help`` lists, or a note on why none."""
    if not re.search(r"--start\b", text):
        return [], "start-method rows skipped: `aiocluster run --help` lists no --start yet"
    found = re.search(r"--start\s+\{([^}]*)\}", text)
    return ([c.strip() for c in found.group(1).split(",")] if found else ["spawn"]), ""


def node_row(name: str, sched: str, how: str) -> Server:
    """Node.js's own cluster module on the classic hello world, with scheduling ``sched``."""
    return Server(
        name=name,
        family="peer",
        describe=f"Node.js cluster, classic hello world, {how}",
        argv=lambda ctx: [NODE, str(APPS / "node_cluster.js")],
        env=lambda ctx: {"PORT": str(ctx.port), "WORKERS": str(ctx.workers), "BENCH_SCHED": sched},
        missing=_need(NODE, "install Node.js (Debian: apt-get install -y nodejs)"),
        reload_note="Node's cluster has no built-in reload",
    )


def aiocluster_row(
    name: str, spec: str, *flags: str, policy: str | None = None, start: str | None = None
) -> Server:
    extra = [
        *flags,
        *(["--policy", policy] if policy else []),
        *(["--start", start] if start else []),
    ]
    if "--protocol" in flags:
        what = "bare asyncio protocol"
    elif spec.startswith("hello_asgi"):
        what = "ASGI hello app, uvicorn's httptools protocol"
    else:
        what = "aiohttp hello app"
    return Server(
        name=name,
        family="aiocluster",
        describe=f"aiocluster run {spec} {' '.join(extra)} ({what}, uvloop)".replace("  ", " "),
        argv=lambda ctx: [
            ctx.bin("aiocluster"),
            "run",
            spec,
            *extra,
            "-w",
            str(ctx.workers),
            "-b",
            f"{HOST}:{ctx.port}",
            # A control socket of its own (none): the default per-user one is taken while any
            # other cluster of this user runs, and the row would refuse to start.
            "--control",
            "off",
        ],
        missing=_need_venv("aiocluster"),
        reload_signal=AIOCLUSTER_RELOAD,
        reload_note=AIOCLUSTER_RELOAD_NOTE,
    )


def write_nginx_conf(ctx: Context) -> None:
    template = (APPS / "nginx.conf").read_text()
    (ctx.tmp / "nginx.conf").write_text(
        template.format(workers=ctx.workers, port=ctx.port, tmp=ctx.tmp)
    )


def build_servers() -> tuple[list[Server], list[str]]:
    """The rows to run, and notes on rows left out. One entry per row: add rows here."""
    notes: list[str] = []
    rows = [
        aiocluster_row("aiocluster-aiohttp", "hello_aiohttp:app"),
        aiocluster_row("aiocluster-protocol", "bare_protocol:HelloProtocol", "--protocol"),
        # The same ASGI app as uvicorn-asgi, gunicorn-asgi and granian-asgi (the asgi extra).
        aiocluster_row("aiocluster-asgi", "hello_asgi:app"),
    ]
    help_text, why = aiocluster_help()
    if why:
        notes.append(f"policy and start-method rows skipped: {why}")
    policies, note = aiocluster_policies(help_text) if help_text else ([], "")
    if note:
        notes.append(note)
    # The fork start method (a zygote forks the workers) is to become the default: this row keeps
    # the fresh-interpreter start measured beside it, once `aiocluster run` has --start.
    methods, note = aiocluster_start_methods(help_text) if help_text else ([], "")
    if note:
        notes.append(note)
    if "spawn" in methods:
        rows.append(aiocluster_row("aiocluster-aiohttp-spawn", "hello_aiohttp:app", start="spawn"))
    for policy in policies:
        rows.append(
            aiocluster_row(f"aiocluster-aiohttp-{policy}", "hello_aiohttp:app", policy=policy)
        )
        rows.append(aiocluster_row(f"aiocluster-asgi-{policy}", "hello_asgi:app", policy=policy))
        rows.append(
            aiocluster_row(
                f"aiocluster-protocol-{policy}",
                "bare_protocol:HelloProtocol",
                "--protocol",
                policy=policy,
            )
        )
    rows += [
        Server(
            name="gunicorn-aiohttp",
            family="peer",
            describe="gunicorn -k aiohttp.GunicornUVLoopWebWorker, the same aiohttp app",
            argv=lambda ctx: [
                ctx.bin("gunicorn"),
                "hello_aiohttp:app",
                "-k",
                "aiohttp.GunicornUVLoopWebWorker",
                "-w",
                str(ctx.workers),
                "-b",
                f"{HOST}:{ctx.port}",
                "--backlog",
                "2048",
                "--log-level",
                "warning",
            ],
            missing=_need_venv("gunicorn"),
            reload_signal=signal.SIGHUP,
        ),
        Server(
            name="uvicorn-asgi",
            family="peer",
            describe="uvicorn --workers N --http httptools --loop uvloop, equivalent ASGI app",
            argv=lambda ctx: [
                ctx.bin("uvicorn"),
                "hello_asgi:app",
                "--workers",
                str(ctx.workers),
                "--http",
                "httptools",
                "--loop",
                "uvloop",
                "--host",
                HOST,
                "--port",
                str(ctx.port),
                "--backlog",
                "2048",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            missing=_need_venv("uvicorn"),
            reload_signal=signal.SIGHUP,
        ),
        Server(
            name="gunicorn-asgi",
            family="peer",
            describe="gunicorn -k asgi (gunicorn's own ASGI worker, gunicorn >= 27) "
            "--asgi-loop uvloop, the same ASGI app",
            argv=lambda ctx: [
                ctx.bin("gunicorn"),
                "hello_asgi:app",
                "-k",
                "asgi",
                "--asgi-loop",
                "uvloop",
                "-w",
                str(ctx.workers),
                "-b",
                f"{HOST}:{ctx.port}",
                "--backlog",
                "2048",
                "--log-level",
                "warning",
            ],
            missing=_need_venv("gunicorn"),
            reload_signal=signal.SIGHUP,
        ),
        Server(
            name="granian-asgi",
            family="peer",
            describe="granian --interface asgi --workers N --loop uvloop, equivalent ASGI app",
            argv=lambda ctx: [
                ctx.bin("granian"),
                "--interface",
                "asgi",
                "--workers",
                str(ctx.workers),
                "--loop",
                "uvloop",
                "--http",
                "1",
                "--no-ws",
                "--host",
                HOST,
                "--port",
                str(ctx.port),
                "--backlog",
                "2048",
                "--log-level",
                "warning",
                "hello_asgi:app",
            ],
            missing=_need_venv("granian"),
            reload_signal=signal.SIGHUP,
        ),
        node_row("node-cluster", "none", "SCHED_NONE (workers accept)"),
        node_row("node-cluster-rr", "rr", "SCHED_RR (primary hands out)"),
        Server(
            name="nginx",
            family="ceiling",
            describe="nginx `return 200`, worker_processes N (the ceiling)",
            argv=lambda ctx: [
                shutil.which("nginx") or "/usr/sbin/nginx",
                "-p",
                str(ctx.tmp),
                "-c",
                str(ctx.tmp / "nginx.conf"),
                "-e",
                str(ctx.tmp / "error.log"),
            ],
            prepare=write_nginx_conf,
            missing=_need("/usr/sbin/nginx", "apt-get update && apt-get install -y nginx"),
            reload_signal=signal.SIGHUP,
        ),
    ]
    return rows, notes


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    """A port nobody listens on now (bind port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http_status(port: int, timeout: float) -> int | None:
    """One GET / on a new connection: the status code, or None if it failed."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(match.group(1)) if match else None


def pss_kib(pid: int) -> int | None:
    """Proportional set size of one process, from /proc/PID/smaps_rollup."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    match = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


class Running:
    """A started server: its process, log, and the means to stop it for sure."""

    def __init__(self, server: Server, ctx: Context, log_path: Path) -> None:
        import psutil

        self.server = server
        self.ctx = ctx
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = {**os.environ, **server.env(ctx)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APPS), env.get("PYTHONPATH")]))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            server.argv(ctx),
            cwd=APPS,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, away from our terminal's Ctrl-C
        )
        self.ps = psutil.Process(self.proc.pid)
        self.seen: dict[int, Any] = {}  # every descendant ever seen, to be sure they end
        self._log_read = 0  # how much of the log zygote_pids_logged() has read
        self._zygotes_logged: set[int] = set()

    def descendants(self) -> list[Any]:
        import psutil

        try:
            found = self.ps.children(recursive=True)
        except psutil.Error:
            found = []
        for proc in found:
            self.seen.setdefault(proc.pid, proc)
        return found

    def zygote_pids_logged(self) -> set[int]:
        """Zygote pids the aiocluster primary named in its log (``zygote (pid N) loaded ...``)."""
        if self.server.family != "aiocluster":
            return set()
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_read)
                text = log.read()
        except OSError:
            return self._zygotes_logged
        complete = text.rfind(b"\n") + 1  # a line being written is read again next time
        self._log_read += complete
        for match in re.finditer(rb"zygote \(pid (\d+)\)", text[:complete]):
            self._zygotes_logged.add(int(match.group(1)))
        return self._zygotes_logged

    def split_children(self) -> tuple[list[Any], list[Any]]:
        """The primary's children less multiprocessing helpers, split into (workers, zygotes).

        aiocluster's fork start method keeps a zygote, a child of the primary that forks the
        workers and serves nothing (normally one; two for a moment when it is replaced). A
        zygote the primary spawned has AIOCLUSTER_ZYGOTE_FD in its environment; the workers it
        forks are re-parented to the primary and inherit that environment block (which
        /proc/PID/environ shows as it was at exec), so of several children marked so the oldest
        is the zygote. A zygote the primary forked from itself is not marked at all: the
        primary's log names it. Workers still under a zygote count as workers too.
        """
        import psutil

        children, marked = [], []
        for proc in self.descendants():
            try:
                if proc.ppid() != self.proc.pid:
                    continue
                cmdline = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if "resource_tracker" in cmdline or "semaphore_tracker" in cmdline:
                continue
            children.append(proc)
            if _is_zygote(proc.pid):
                marked.append(proc)
        named = self.zygote_pids_logged()
        oldest = min(marked, key=_create_time).pid if marked else None
        zygotes = [p for p in children if p.pid in named or p.pid == oldest]
        workers = [p for p in children if p not in zygotes]
        for zygote in zygotes:
            with contextlib.suppress(psutil.Error):
                workers += zygote.children()
        return workers, zygotes

    def workers(self) -> list[Any]:
        """The serving processes: the primary's children, less helpers and zygotes."""
        return self.split_children()[0]

    def zygotes(self) -> list[Any]:
        """aiocluster's zygote (fork start method): normally one, none under spawn."""
        return self.split_children()[1]

    def cpu_s(self) -> float:
        """CPU seconds used so far by the primary and every live descendant."""
        import psutil

        total = 0.0
        for proc in [self.ps, *self.descendants()]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_first_answer(self, deadline: float) -> float:
        """Seconds from the start to the first 200 answer (polls a connect, then a GET)."""
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"exited with {self.proc.returncode} before answering")
            if http_status(self.ctx.port, timeout=2.0) == 200:
                return time.monotonic() - self.started
            time.sleep(0.005)
        raise RuntimeError("no answer before the deadline")

    def wait_workers(self, deadline: float) -> int:
        """Wait until the expected number of workers exist; how many were found."""
        count = 0
        while time.monotonic() < deadline:
            count = len(self.workers())
            if count >= self.ctx.workers:
                break
            time.sleep(0.05)
        if self.server.family == "aiocluster":
            # The primary logs `ready: N workers listening` once every worker listens.
            while time.monotonic() < deadline and b"ready:" not in self.log_path.read_bytes():
                time.sleep(0.05)
        return count

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the primary, then SIGKILL whatever is left; reap the primary."""
        import psutil

        self.descendants()
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.signal(signal.SIGKILL)
                self.proc.wait()
        # Workers in sessions of their own (aiocluster starts them so) are not in the group:
        # give them a moment to go with their primary, then make sure.
        left = [p for p in self.seen.values() if _running(p)]
        if left:
            _, left = psutil.wait_procs(left, timeout=5)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if left:
            psutil.wait_procs(left, timeout=5)
        self._log.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


ZYGOTE_MARK = b"AIOCLUSTER_ZYGOTE"  # AIOCLUSTER_ZYGOTE_FD=N today; any such name counts


def _is_zygote(pid: int) -> bool:
    """Whether the process's environment (as at its exec) has an AIOCLUSTER_ZYGOTE* variable."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return any(entry.startswith(ZYGOTE_MARK) for entry in environ.split(b"\0"))


def _create_time(proc: Any) -> float:
    import psutil

    try:
        return float(proc.create_time())
    except psutil.Error:
        return float("inf")


def _running(proc: Any) -> bool:
    import psutil

    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


RUNNING: list[Running] = []


@contextlib.contextmanager
def started(
    server: Server, ctx: Context, log_path: Path, *, stop_timeout: float = 15.0
) -> Iterator[Running]:
    if server.prepare is not None:
        server.prepare(ctx)
    running = Running(server, ctx, log_path)
    RUNNING.append(running)
    try:
        yield running
    finally:
        running.stop(stop_timeout)
        RUNNING.remove(running)


# -- load -------------------------------------------------------------------------------------


def wrk_argv(port: int, mode: str, duration: float, settings: Settings) -> list[str]:
    return [
        "wrk",
        f"-t{settings.wrk_threads}",
        f"-c{settings.connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA[mode]),
        f"http://{HOST}:{port}/",
    ]


def wrk_env(tally: bool) -> dict[str, str]:
    return {**os.environ, "BENCH_TALLY": "1" if tally else "0"}


def wrk_result(stdout: str, stderr: str, returncode: int) -> dict[str, Any]:
    """wrk's BENCH_JSON report (see wrk_report.lua), plus requests/s and error sums."""
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            break
    else:
        raise RuntimeError(f"wrk printed no report (exit {returncode}): {stderr.strip()}")
    seconds = result["duration_us"] / 1e6
    result["rps"] = result["requests"] / seconds if seconds else 0.0
    errors = result["errors"]
    result["socket_errors"] = sum(errors[k] for k in ("connect", "read", "write", "timeout"))
    result["non_2xx"] = errors["status"]
    return result


def wrk(
    port: int, mode: str, duration: float, settings: Settings, *, tally: bool = False
) -> dict[str, Any]:
    """One wrk run, bounded by -d (and a timeout on top)."""
    proc = subprocess.run(
        wrk_argv(port, mode, duration, settings),
        capture_output=True,
        text=True,
        env=wrk_env(tally),
        timeout=duration + 30,
        check=False,
    )
    return wrk_result(proc.stdout, proc.stderr, proc.returncode)


def balance(pids: dict[str, int]) -> dict[str, Any]:
    """Share of answers per worker pid, and min/max of those shares (1.0 = perfectly even)."""
    total = sum(pids.values())
    if not total:
        return {"shares": [], "min_over_max": None}
    shares = sorted((n / total for n in pids.values()), reverse=True)
    return {
        "shares": [round(s, 4) for s in shares],
        "min_over_max": round(shares[-1] / shares[0], 4),
        "answers": total,
    }


def memory(running: Running) -> dict[str, Any]:
    """PSS of the workers (their average is the figure), of the primary, and of a zygote."""
    workers, zygotes = running.split_children()
    worker_pss = [k for k in (pss_kib(p.pid) for p in workers) if k is not None]
    primary = pss_kib(running.proc.pid)
    zygote_pss = [k for k in (pss_kib(p.pid) for p in zygotes) if k is not None]
    return {
        "primary_pss_kib": primary,
        "zygote_pss_kib": sum(zygote_pss) if zygote_pss else None,
        "zygotes_found": len(zygotes),
        "worker_pss_kib": worker_pss,
        "worker_pss_avg_kib": round(statistics.mean(worker_pss)) if worker_pss else None,
        "workers_found": len(workers),
    }


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> tuple[float, float, float]:
    """CPU seconds since boot, all CPUs, from /proc/stat: (not idle, of which in interrupts,
    of which stolen).

    Loopback TCP does much of its work in softirqs, which the kernel may account there rather
    than to the sending or receiving process; they are reported apart from "other". Steal is
    time the hypervisor gave this VM's CPUs to someone else while they had work: a busy host,
    invisible from inside but for this column; it is reported apart from "other" too.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / _CLK_TCK
    return busy, (irq + softirq) / _CLK_TCK, steal / _CLK_TCK


def children_cpu_s() -> float:
    """CPU seconds of our reaped children (wrk, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclasses.dataclass(frozen=True)
class CpuSample:
    """Where the machine's CPU time went, to tell a measurement from a busy neighbour."""

    wall: float
    busy: float
    irq: float
    steal: float
    server: float
    children: float

    @classmethod
    def take(cls, running: Running) -> CpuSample:
        busy, irq, steal = machine_busy_s()
        return cls(time.monotonic(), busy, irq, steal, running.cpu_s(), children_cpu_s())

    def until(self, end: CpuSample) -> dict[str, float]:
        """Cores used over the window by the server, by wrk, by interrupts, by everything else,
        and stolen by the hypervisor."""
        wall = end.wall - self.wall
        server = (end.server - self.server) / wall
        wrk_cores = (end.children - self.children) / wall
        busy = (end.busy - self.busy) / wall
        irq = (end.irq - self.irq) / wall
        steal = (end.steal - self.steal) / wall
        return {
            "server_cores": round(server, 3),
            "wrk_cores": round(wrk_cores, 3),
            "irq_cores": round(irq, 3),
            "other_cores": round(max(0.0, busy - server - wrk_cores - irq - steal), 3),
            "steal_cores": round(steal, 3),
        }


QUIET_WINDOW = 0.3  # seconds: 60 ticks of 2 cores at 100 Hz, enough to see 0.2 busy cores


def wait_quiet(settings: Settings) -> dict[str, float]:
    """Wait (up to settings.quiet_wait) until the machine is idle besides us, before a run.

    This machine may be shared (other sessions run test suites on it): a load run measured
    while something else takes a core says little. Samples busy cores over 0.3 s windows,
    with the server idle, until they drop under settings.quiet_cores; returns what was seen.
    """
    began = time.monotonic()
    busy = 0.0
    while True:
        start_busy, _, start_steal = machine_busy_s()
        start = time.monotonic()
        time.sleep(QUIET_WINDOW)
        end_busy, _, end_steal = machine_busy_s()
        wall = time.monotonic() - start
        busy = (end_busy - start_busy) / wall  # steal included: a busy host counts too
        waited = time.monotonic() - began
        if busy < settings.quiet_cores or waited >= settings.quiet_wait:
            return {
                "idle_busy_cores": round(busy, 3),
                "idle_steal_cores": round((end_steal - start_steal) / wall, 3),
                "waited_s": round(waited, 1),
            }


def measure_reload(running: Running, settings: Settings) -> dict[str, Any]:
    """Failed requests while the server replaces its workers under keep-alive load.

    wrk starts (bounded by -d at reload_duration + 30 s), a third of reload_duration later the
    server gets its reload signal; once every old worker is gone and N new ones exist (some
    servers respawn one worker at a time, seconds apart) and another third has passed, wrk is
    stopped with SIGINT, which makes it report. Failures are wrk's socket errors
    (connect/read/write/timeout) plus non-2xx answers. Note that wrk counts a keep-alive
    connection that the server closes between two requests as a read error; a real client would
    retry such an idempotent request, so these are an upper bound on what users would see.
    """
    sig = running.server.reload_signal
    if sig is None:
        return {"skipped": running.server.reload_note or "no reload mechanism"}
    third = settings.reload_duration / 3
    bound = settings.reload_duration + 30
    before = {p.pid for p in running.workers()}
    load = subprocess.Popen(
        wrk_argv(running.ctx.port, "keepalive", bound, settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=wrk_env(False),
    )
    try:
        time.sleep(third)
        signalled = time.monotonic()
        running.signal(sig)
        replaced_after = None
        deadline = signalled + bound - third - 2
        while time.monotonic() < deadline and load.poll() is None:
            now = {p.pid for p in running.workers()}
            if not (now & before) and len(now) >= running.ctx.workers:
                replaced_after = time.monotonic() - signalled
                break
            time.sleep(0.05)
        time.sleep(third)
        load.send_signal(signal.SIGINT)
        stdout, stderr = load.communicate(timeout=30)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    result = wrk_result(stdout, stderr, load.returncode)
    return {
        "signal": sig.name,
        "requests": result["requests"],
        "failed": result["socket_errors"] + result["non_2xx"],
        "errors": result["errors"],
        "replaced_after_s": None if replaced_after is None else round(replaced_after, 2),
        "still_answers": http_status(running.ctx.port, timeout=5.0) == 200,
    }


# -- one server ---------------------------------------------------------------------------------


START_SETTLE = 0.2  # seconds between a timed start's first answer and its stop
START_STOP_TIMEOUT = 5.0  # granian, stopped while a worker boots, may ignore SIGTERM


def time_start(server: Server, settings: Settings, logs: Path, tag: str) -> float:
    """Start ``server``, time it from Popen to its first HTTP 200, and stop it.

    Before the stop, the runner waits for the workers (aiocluster: its ready line) and a
    moment more: a server stopped while its workers still boot may hang in its shutdown.
    """
    with tempfile.TemporaryDirectory(prefix=f"bench-{server.name}-") as tmp:
        ctx = Context(port=free_port(), workers=settings.workers, tmp=Path(tmp))
        log_path = logs / f"{server.name}.{tag}.log"
        with started(server, ctx, log_path, stop_timeout=START_STOP_TIMEOUT) as running:
            seconds = running.wait_first_answer(time.monotonic() + 60)
            running.wait_workers(time.monotonic() + 30)
            time.sleep(START_SETTLE)
    return seconds


def time_starts(servers: list[Server], settings: Settings, logs: Path) -> dict[str, dict[str, Any]]:
    """First answer of each server: one warm-up start, then ``settings.starts`` timed ones.

    Each pass starts every server once, in the run order, reversed every other pass, so that
    the k-th starts of two servers are seconds apart and their ratio can be taken pair by pair.
    The warm-up pass (its time is kept but not counted) pays for a cold page cache: the first
    start of a program after a while reads its files from disk, the later ones do not.
    """
    found: dict[str, dict[str, Any]] = {
        s.name: {"warmup_start_s": None, "first_answer_by_pass": []} for s in servers
    }
    for number in range(settings.starts + 1):
        order = servers if number % 2 == 0 else servers[::-1]
        what = "warm-up start (not counted)" if number == 0 else f"timed start {number}"
        said = []
        for server in order:
            entry = found[server.name]
            seconds: float | None = None
            if "start_error" not in entry:
                try:
                    seconds = time_start(server, settings, logs, f"start{number}")
                    said.append(f"{server.name} {seconds * 1000:.0f}")
                except Exception as err:
                    entry["start_error"] = f"{err}"
                    said.append(f"{server.name} failed: {err}")
            if number == 0:
                entry["warmup_start_s"] = seconds
            else:
                entry["first_answer_by_pass"].append(seconds)
        _say(f"{what}, ms: " + ", ".join(said))
    return found


def bench_server(
    server: Server, settings: Settings, logs: Path, *, number: int, position: int
) -> dict[str, Any]:
    """One round for one server: load in both modes, memory, then the reload."""
    row: dict[str, Any] = {"name": server.name, "family": server.family}
    row["describe"] = server.describe
    row["round"] = number + 1
    row["position"] = position
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"bench-{server.name}-") as tmp:
        ctx = Context(port=free_port(), workers=settings.workers, tmp=Path(tmp))
        row["argv"] = server.argv(ctx)
        log_path = logs / f"{server.name}.round{number + 1}.log"
        with started(server, ctx, log_path) as running:
            try:
                row["first_answer_in_round_s"] = running.wait_first_answer(time.monotonic() + 60)
                row["workers_found"] = running.wait_workers(time.monotonic() + 30)
                for mode in MODES:
                    quiet = wait_quiet(settings)
                    warm = wrk(ctx.port, mode, settings.warmup, settings, tally=True)
                    before = CpuSample.take(running)
                    measured = wrk(ctx.port, mode, settings.duration, settings)
                    cpu = before.until(CpuSample.take(running))
                    row[mode] = {
                        "rps": round(measured["rps"], 1),
                        "p50_ms": measured["latency_us"]["p50"] / 1000,
                        "p90_ms": measured["latency_us"]["p90"] / 1000,
                        "p99_ms": measured["latency_us"]["p99"] / 1000,
                        "requests": measured["requests"],
                        "socket_errors": measured["socket_errors"],
                        "non_2xx": measured["non_2xx"],
                        "errors": measured["errors"],
                        "balance": balance(warm["pids"]),
                        "cpu": cpu,
                        "before": quiet,
                        "requests_per_server_cpu_s": round(measured["rps"] / cpu["server_cores"], 1)
                        if cpu["server_cores"]
                        else None,
                    }
                    _say(
                        f"  {mode:9} {measured['rps']:>10,.0f} req/s  "
                        f"p50 {row[mode]['p50_ms']:.2f} ms  p99 {row[mode]['p99_ms']:.2f} ms  "
                        f"errors {measured['socket_errors']}+{measured['non_2xx']}  "
                        f"shares {row[mode]['balance']['shares']}  cores: server "
                        f"{cpu['server_cores']:.2f} wrk {cpu['wrk_cores']:.2f} "
                        f"irq {cpu['irq_cores']:.2f} other {cpu['other_cores']:.2f} "
                        f"steal {cpu['steal_cores']:.2f}"
                    )
                row["memory"] = memory(running)
                if settings.reloads:
                    row["reload"] = measure_reload(running, settings)
            except Exception as err:
                row["error"] = f"{err}"
                row["log_tail"] = running.log_tail()
                _say(f"  error: {err}\n{row['log_tail']}")
    row["elapsed_s"] = round(time.monotonic() - began, 2)
    return row


#: What each round keeps of a mode, for the ratios taken within a round (report.py).
ROUND_FIELDS = ("rps", "requests_per_server_cpu_s")
ROUND_CPU_FIELDS = ("server_cores", "other_cores", "steal_cores")


def merge_rounds(rounds: list[dict[str, Any]], starts: dict[str, Any]) -> dict[str, Any]:
    """One row from several rounds: per mode, the round with the median requests/s.

    ``per_round`` keeps each round's own figures in round order, so that report.py can take
    a ratio between two servers within each round; ``first_answer_by_pass`` keeps each timed
    start in pass order (None where it failed), for the same pairing of starts.
    """
    row = {k: v for k, v in rounds[0].items() if k not in ("round", "position", "elapsed_s")}
    row.pop("first_answer_in_round_s", None)
    row["rounds"] = len(rounds)
    for mode in MODES:
        runs = [r[mode] for r in rounds if r.get(mode)]
        if runs:
            runs.sort(key=lambda run: run["rps"])
            row[mode] = {**runs[len(runs) // 2], "rps_all": [run["rps"] for run in runs]}
    per_round = []
    for r in rounds:
        entry: dict[str, Any] = {
            "round": r["round"],
            "position": r["position"],
            "elapsed_s": r.get("elapsed_s"),
        }
        if r.get("first_answer_in_round_s") is not None:
            entry["first_answer_s"] = round(r["first_answer_in_round_s"], 4)
        waited = [r[mode]["before"]["waited_s"] for mode in MODES if r.get(mode)]
        if waited:
            entry["quiet_waited_s"] = round(sum(waited), 1)
        for mode in MODES:
            if r.get(mode):
                data = {k: r[mode][k] for k in ROUND_FIELDS}
                data.update({k: r[mode]["cpu"][k] for k in ROUND_CPU_FIELDS})
                entry[mode] = data
        if r.get("error"):
            entry["error"] = r["error"]
        per_round.append(entry)
    row["per_round"] = per_round
    by_pass = starts.get("first_answer_by_pass", [])
    timed = [s for s in by_pass if s is not None]
    row["first_answer_s"] = timed
    row["first_answer_median_s"] = statistics.median(timed) if timed else None
    row["first_answer_by_pass"] = by_pass
    row["warmup_start_s"] = starts.get("warmup_start_s")
    if starts.get("start_error"):
        row["start_error"] = starts["start_error"]
    memories = [r["memory"] for r in rounds if r.get("memory")]
    if memories:
        row["memory"] = memories[-1]
    reloads = [r["reload"] for r in rounds if r.get("reload")]
    if reloads:
        # The first round's (as results from before reloads ran every round have it), and
        # every round's: a target of 0 failures holds only if it holds in each.
        row["reload"] = reloads[0]
        row["reloads"] = reloads
    errors = [r["error"] for r in rounds if r.get("error")]
    if errors:
        row["error"] = "; ".join(errors)
    return row


#: The order servers run in within a round (reversed every other round): each aiocluster row
#: beside the peer its target ratio compares it with, so that the two run close together.
#: Exact names first, then globs; rows matching nothing run last, in table order.
RUN_ORDER = (
    "uvicorn-asgi",
    "aiocluster-asgi",
    "gunicorn-asgi",
    "aiocluster-asgi-rr",
    "aiocluster-asgi-reuseport",
    "aiocluster-aiohttp",
    "aiocluster-aiohttp-spawn",
    "gunicorn-aiohttp",
    "aiocluster-aiohttp-reuseport",
    "aiocluster-aiohttp-*",
    "aiocluster-aiohttp-rr",
    "node-cluster-rr",
    "aiocluster-protocol-rr",
    "node-cluster",
    "aiocluster-protocol",
    "nginx",
    "aiocluster-protocol-reuseport",
    "aiocluster-protocol-*",
    "granian-asgi",
)


def run_order(servers: list[Server]) -> list[Server]:
    """``servers`` in RUN_ORDER (see there)."""

    def key(item: tuple[int, Server]) -> tuple[int, int]:
        index, server = item
        if server.name in RUN_ORDER:
            return RUN_ORDER.index(server.name), index
        for place, pattern in enumerate(RUN_ORDER):
            if fnmatch.fnmatch(server.name, pattern):
                return place, index
        return len(RUN_ORDER), index

    return [server for _, server in sorted(enumerate(servers), key=key)]


# -- machine ------------------------------------------------------------------------------------


def _out(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    return (proc.stdout + proc.stderr).strip()


def machine() -> dict[str, Any]:
    from importlib import metadata

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in (
        "aiocluster",
        "aiohttp",
        "uvloop",
        "gunicorn",
        "uvicorn",
        "httptools",
        "websockets",
        "granian",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    versions["node"] = _out([NODE, "--version"])
    versions["nginx"] = _out(["nginx", "-v"]).removeprefix("nginx version: ")
    wrk_text = _out(["wrk", "--version"])
    found = re.search(r"wrk (\S+)", wrk_text)
    versions["wrk"] = found.group(1) if found else wrk_text.splitlines()[0] if wrk_text else "?"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "versions": versions,
        "git": _out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }


# -- setup and entry point --------------------------------------------------------------------


#: The checkout's extras the rows need: ``asgi`` for the aiocluster-asgi rows.
EXTRAS = "asgi"


def setup() -> int:
    """Make the benchmark venv with every dependency of every row, and install wrk and nginx
    from the distribution."""
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "-r", str(HERE / "requirements.txt")], check=True)
    # The checkout's own dependencies and extras (aiohttp, prometheus-client, uvicorn...): the
    # reinstall at every run below is --no-deps.
    subprocess.run([*pip, f"{REPO}[{EXTRAS}]"], check=True)
    install_checkout()
    missing = [tool for tool in ("wrk", "nginx") if not shutil.which(tool)]
    if missing:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(["apt-get", "update", "-q"], check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True)
        else:
            print(f"install {' '.join(missing)}: sudo apt-get install -y {' '.join(missing)}")
            return 1
    if not Path(NODE).exists():
        print("Node.js not found: the node rows will be skipped (apt-get install -y nodejs)")
    print(f"ready: {VENV}")
    return 0


def install_checkout() -> str:
    """Install this checkout into the venv as users install a release: not editable.

    An editable install adds a finder to every interpreter's start (``site`` imports it, and
    pathlib with it: ~20 ms of each start to first answer here), which no peer pays and no
    user's deployment has. Done at every run, so the servers run the checkout as it is now.
    """
    described = _out(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    _say(f"installing aiocluster {described} from {REPO} into {VENV} (not editable)")
    pip = [str(VENV / "bin" / "pip"), "install", "-q", "--no-deps", "--force-reinstall"]
    subprocess.run([*pip, str(REPO)], check=True)
    # --no-deps keeps the reinstall quick; a dependency the checkout gained since --setup is
    # installed now (``pip check`` names what the installed aiocluster lacks).
    check = subprocess.run(
        [str(VENV / "bin" / "pip"), "check"], capture_output=True, text=True, check=False
    )
    if any(line.startswith("aiocluster ") for line in check.stdout.splitlines()):
        _say(f"installing the checkout's missing dependencies:\n{check.stdout.strip()}")
        subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "-q", f"{REPO}[{EXTRAS}]"], check=True
        )
    return described


def _reexec_in_venv() -> None:
    """Run under the benchmark venv's Python (psutil, matplotlib, the servers live there)."""
    python = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve() or not python.exists():
        return
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def _say(text: str) -> None:
    print(text, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="make the venv, install wrk/nginx")
    parser.add_argument("--quick", action="store_true", help="short runs: a few minutes in all")
    parser.add_argument("--workers", type=int, default=2, help="workers for every server (2)")
    parser.add_argument(
        "--duration",
        type=float,
        help=f"seconds per measured run (quick {QUICK_DURATION:g}, 10; whole seconds for wrk)",
    )
    parser.add_argument("--warmup", type=float, help="seconds of warmup per mode (quick 1, 3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument(
        "--starts", type=int, help="timed starts per server, after one warm-up start (3)"
    )
    parser.add_argument(
        "--reload-duration", type=float, help="seconds of load around a reload (quick 3, 12)"
    )
    parser.add_argument("--rounds", type=int, help="rounds over all servers (3)")
    parser.add_argument(
        "--quiet-cores",
        type=float,
        default=0.2,
        help="before each mode, wait until the machine's busy cores drop under this (0.2)",
    )
    parser.add_argument(
        "--quiet-wait", type=float, help="longest wait for that, seconds (quick 10, 30)"
    )
    parser.add_argument("--no-reloads", action="store_true", help="skip the reload runs")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="rows to run (globs allowed)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument(
        "--label",
        help="name of the results (LABEL.json, .md, .png; default quick or full), e.g. "
        "asgi-quick for a run of --only some rows, which should not replace quick.json",
    )
    parser.add_argument("--list", action="store_true", help="print the server table and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.setup:
        return setup()
    _reexec_in_venv()
    quick = bool(args.quick)
    settings = Settings(
        workers=args.workers,
        duration=args.duration or (QUICK_DURATION if quick else 10.0),
        warmup=args.warmup or (1.0 if quick else 3.0),
        connections=args.connections,
        wrk_threads=args.wrk_threads,
        starts=args.starts or 3,
        reload_duration=args.reload_duration or (3.0 if quick else 12.0),
        reloads=not args.no_reloads,
        rounds=args.rounds or 3,
        quiet_cores=args.quiet_cores,
        quiet_wait=args.quiet_wait if args.quiet_wait is not None else (10.0 if quick else 30.0),
        quick=quick,
        out=args.out,
    )
    installed = "" if args.list else install_checkout()
    servers, notes = build_servers()
    if args.only:
        servers = [s for s in servers if any(fnmatch.fnmatch(s.name, p) for p in args.only)]
    if args.list:
        for server in servers:
            why = server.missing()
            print(f"{server.name:28} {server.describe}" + (f"  [skip: {why}]" if why else ""))
        for note in notes:
            print(f"note: {note}")
        return 0
    if not shutil.which("wrk"):
        print(
            "wrk not found: install it from the distribution's packages\n"
            "  apt-get update && apt-get install -y wrk     (or: python benchmarks/run.py --setup)",
            file=sys.stderr,
        )
        return 2
    try:
        import psutil  # noqa: F401
    except ImportError:
        print(f"psutil missing: run `python benchmarks/run.py --setup` ({VENV})", file=sys.stderr)
        return 2

    # SIGTERM (and SIGHUP) end the run like Ctrl-C: every server is stopped on the way out.
    def interrupt(sig: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(sig).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)

    settings.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    info = machine()
    info["installed"] = installed
    label = args.label or ("quick" if quick else "full")
    results: dict[str, Any] = {
        "label": label,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()
        },
        "machine": info,
        "notes": list(notes),
        "servers": [],
    }
    _say(f"{label} run, {settings.workers} workers each; logs in {logs}")
    for note in notes:
        _say(f"note: {note}")
    began = time.monotonic()
    interrupted = False
    rounds: dict[str, list[dict[str, Any]]] = {}
    starts: dict[str, dict[str, Any]] = {}
    runnable = []
    for server in servers:
        why = server.missing()
        if why:
            results["notes"].append(f"{server.name} skipped: {why}")
            _say(f"{server.name}: skipped ({why})")
        else:
            runnable.append(server)
    ordered = run_order(runnable)
    results["run_order"] = [s.name for s in ordered]
    phases: dict[str, float] = {}
    results["phases_s"] = phases
    try:
        starts = time_starts(ordered, settings, logs)
        phases["starts"] = round(time.monotonic() - began, 1)
        for number in range(settings.rounds):
            # Reversed every other round: no server always runs first, and a drift of the
            # machine's speed over a round weighs on both sides of a ratio alike.
            order = ordered if number % 2 == 0 else ordered[::-1]
            for position, server in enumerate(order):
                _say(f"{server.name} (round {number + 1}/{settings.rounds}): {server.describe}")
                row = bench_server(server, settings, logs, number=number, position=position)
                rounds.setdefault(server.name, []).append(row)
        phases["rounds"] = round(time.monotonic() - began - phases["starts"], 1)
    except KeyboardInterrupt:
        interrupted = True
        _say("interrupted: stopping servers")
    finally:
        for running in list(RUNNING):
            running.stop()
    results["servers"] = [
        merge_rounds(rounds[s.name], starts.get(s.name, {})) for s in runnable if s.name in rounds
    ]
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    results["interrupted"] = interrupted
    path = settings.out / f"{label}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    _say(f"wrote {path} ({results['elapsed_s']} s)")
    if not interrupted:
        from report import write_report  # benchmarks/ is on sys.path: this file lives there

        for written in write_report(path):
            _say(f"wrote {written}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
