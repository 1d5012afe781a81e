"""Servers as processes: started in a group of their own, their workers found, stopped for sure.

Every server started goes through ``started()``, which stops and reaps it (and every
descendant it was seen to have) on the way out, errors and Ctrl-C included; ``RUNNING`` lists
the ones up, for the runner's last-resort stop.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import APPS, HOST, Context
from .servers import Server


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
            found: list[Any] = list(self.ps.children(recursive=True))
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

    def primary_cpu_s(self) -> float:
        """CPU seconds used so far by the primary (the master) alone, not its children."""
        import psutil

        try:
            times = self.ps.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_first_answer(self, deadline: float) -> float:
        """Seconds from the exec (just before ``Popen``) to the first 200 answer: a GET on a new
        connection every 2 ms, each bounded to 2 s."""
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"exited with {self.proc.returncode} before answering")
            if http_status(self.ctx.port, timeout=2.0) == 200:
                return time.monotonic() - self.started
            # 2 ms: a start is timed to that resolution (a first answer is ~150-300 ms).
            time.sleep(0.002)
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
        left = [p for p in self.seen.values() if is_running(p)]
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


def is_running(proc: Any) -> bool:
    """Whether a psutil process still runs (a zombie does not)."""
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
