"""``--pid FILE``: the primary's pid, for service managers and scripts that signal it.

Claimed at start (a file naming a live process refuses the start, as gunicorn's does; a stale
one is replaced), written once every worker listens — to a temporary file renamed over FILE,
so a reader never sees it half-written — and removed on exit if it still names this process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from aiocluster._errors import ConfigError
from aiocluster._process import Account

__all__ = ["PidFile"]

log = logging.getLogger("aiocluster")


class PidFile:
    """The pid file at ``path``; ``owner`` (``--user``) gets it, so that user may manage it."""

    def __init__(self, path: Path, owner: Account | None = None) -> None:
        self.path = path.absolute()
        self._owner = owner
        self._written = False

    def claim(self) -> None:
        """At start: refuse (ConfigError) if the file names a live process other than us."""
        if not self.path.parent.is_dir():
            raise ConfigError(f"--pid {self.path}: the directory {self.path.parent} does not exist")
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        except OSError as err:
            raise ConfigError(f"--pid {self.path}: cannot read it: {err.strerror or err}") from None
        try:
            pid = int(text.strip())
        except ValueError:
            log.warning("pid file %s holds no pid; replacing it", self.path)
            return
        if pid != os.getpid() and pid > 0 and _alive(pid):
            raise ConfigError(
                f"--pid {self.path}: it names pid {pid}, which is running (another cluster?); "
                "stop that one, or remove the file if that process is not a cluster"
            )
        log.info("pid file %s named pid %d, which is gone; replacing it", self.path, pid)

    def adopt(self, written: bool) -> None:
        """After an in-place upgrade (same pid): the file the old image wrote is ours."""
        self._written = written

    @property
    def written(self) -> bool:
        """True once this process wrote the file (it removes it on exit)."""
        return self._written

    def write(self) -> None:
        """Write this process's pid, atomically (a temporary file renamed over the path)."""
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
                if self._owner is not None:
                    os.fchown(fd, self._owner.uid, self._owner.gid)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            log.error("cannot write the pid file %s: %s", self.path, err.strerror or err)
            return
        self._written = True
        log.info("pid %d written to %s", os.getpid(), self.path)

    def remove(self) -> None:
        """On exit: remove the file if it still names this process."""
        if not self._written:
            return
        self._written = False
        with contextlib.suppress(OSError, ValueError):
            if int(self.path.read_text().strip()) == os.getpid():
                self.path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive all the same
    # A zombie (our own dead child, not yet reaped) holds no pid file.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True
