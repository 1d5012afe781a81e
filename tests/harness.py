"""Run real clusters in tests: start a primary, read its log, find its workers, reap them all."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import select
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

APPS = Path(__file__).parent / "apps"
READY = r"ready: (\d+) workers listening"
LISTENING = r"\] INFO aiocluster\.primary: listening on (\S+)"
STARTED = r"started worker (\d+) \(pid (\d+)\)"


def become_subreaper() -> None:
    """Orphaned workers (their primary killed) become our children, so tests reap them too."""
    if sys.platform == "linux":
        pr_set_child_subreaper = 36
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def restore_sigint() -> None:
    """Give the processes tests start the default SIGINT, whatever this one inherited.

    A shell starts a background job (``pytest ... &`` in a script, without job control) with
    SIGINT ignored; the programs tests start would inherit that, and a test's Ctrl-C (SIGINT)
    would reach a command relying on KeyboardInterrupt, ``aiocluster status --watch``, as
    nothing. A handler here is reset to the default in a child by exec; SIG_IGN is not.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


async def wait_pid_gone(pid: int, timeout: float) -> None:
    """Wait (on a pidfd, not a poll) until ``pid`` has exited, then reap it if it is ours."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        try:
            if not select.select([pidfd], [], [], 0)[0]:
                await asyncio.wait_for(exited, timeout)
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class ClusterProcess:
    """A primary process started by a test, with its merged stdout/stderr as lines."""

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.argv = list(argv)
        self.cwd = cwd
        # A private runtime directory: each cluster gets its own control socket directory,
        # so clusters of concurrent tests never meet.
        self.runtime_dir = tempfile.mkdtemp(prefix="aiocluster-test-")
        os.chmod(self.runtime_dir, 0o700)
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "XDG_RUNTIME_DIR": self.runtime_dir,
            **(env or {}),
        }
        self.env.pop("AIOCLUSTER_WORKER_ID", None)
        self.pass_fds = tuple(pass_fds)
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> ClusterProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            pass_fds=self.pass_fds,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            async with self._changed:
                self.lines.append(line.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def _until(self, test: Callable[[], T | None], timeout: float, what: str) -> T:
        """Wait (on new output, not a timer) until ``test()`` returns something."""
        result = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._changed:
                while (result := test()) is None:
                    if self._reader is not None and self._reader.done():
                        break
                    await self._changed.wait()
        if result is None:
            raise AssertionError(f"{what} not seen in:\n{self.output}")
        return result

    async def wait_for(self, pattern: str, timeout: float = 20.0, start: int = 0) -> re.Match[str]:
        """The first line from ``start`` on matching ``pattern``; fails with the log if none."""
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            for line in self.lines[start:]:
                if m := regex.search(line):
                    return m
            return None

        return await self._until(found, timeout, f"a line matching {pattern!r}")

    async def wait_count(self, pattern: str, n: int, timeout: float = 20.0) -> None:
        """Wait until ``n`` lines match ``pattern``."""
        await self._until(
            lambda: True if self.count(pattern) >= n else None,
            timeout,
            f"{n} lines matching {pattern!r}",
        )

    def tracebacks(self, most: int = 3) -> str:
        """The first ``most`` tracebacks in the output, each with the line before it (what
        logged it): what a failed ``"Traceback" not in output`` needs to be read."""
        found: list[str] = []
        for at, line in enumerate(self.lines):
            if line.startswith("Traceback") and len(found) < most:
                end = at + 1
                while end < len(self.lines) and self.lines[end][:1] in (" ", "\t"):
                    end += 1
                found.append("\n".join(self.lines[max(at - 1, 0) : end + 1]))
        return "\n\n".join(found)

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for line in self.lines if regex.search(line))

    async def ready(self, timeout: float = 30.0) -> ClusterProcess:
        await self.wait_for(READY, timeout)
        return self

    @property
    def address(self) -> str:
        for line in self.lines:
            if m := re.search(LISTENING, line):
                return m.group(1)
        raise AssertionError(f"no listening line in:\n{self.output}")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def worker_pids(self) -> dict[int, int]:
        """Every worker ever started: id -> pid."""
        pids = {}
        for line in self.lines:
            if m := re.search(STARTED, line):
                pids[int(m.group(1))] = int(m.group(2))
        return pids

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        """Wait for the primary to exit and its output to end; return its exit status."""
        assert self.proc is not None and self._reader is not None
        try:
            async with asyncio.timeout(timeout):
                code = await self.proc.wait()
                await self._reader
        except TimeoutError:
            raise AssertionError(
                f"the cluster did not exit in {timeout}s:\n{self.output}"
            ) from None
        return code

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path."""
        self.signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def close(self) -> None:
        """Kill whatever is still running (primary and workers) and reap it all.

        Workers are killed before the primary is awaited: asyncio's wait() for the primary
        may also wait for its output pipes, which live workers hold open.
        """
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        for pid in self.worker_pids.values():
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for pid in self.worker_pids.values():
            await wait_pid_gone(pid, 10)
        if self.proc is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self._reader
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def cli(*args: str) -> list[str]:
    """``python -m aiocluster ARGS`` with this interpreter."""
    return [sys.executable, "-m", "aiocluster", *args]
