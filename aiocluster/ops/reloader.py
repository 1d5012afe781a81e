"""``--reload``: a rolling reload whenever a watched source file changes (for development).

The primary watches ``--reload-dir`` (default: the directory it runs in) with ``watchfiles``
(``pip install 'aiocluster[reload]'``) and, on a change, runs the same rolling reload as
``SIGHUP``: every worker is replaced by one that loads the code afresh, with as many workers
as configured — never fewer serving. A change that breaks the import stops that reload before
any worker is touched (the new zygote or worker fails to load, its traceback is in the log),
so the old workers keep serving; the next change that loads reloads.

Watched: files whose name or path under the watched directory matches ``*.py`` or a
``--reload-include`` pattern, except what matches a ``--reload-exclude`` pattern (tested on the
path and on each directory on the way) and what watchfiles always ignores (``__pycache__``,
``.git``, ``.venv``, editor swap and backup files), and hidden files.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path, PurePath

from aiocluster._errors import ConfigError

__all__ = ["DEFAULT_EXCLUDE", "DEFAULT_INCLUDE", "Patterns", "Reloader"]

log = logging.getLogger("aiocluster")

DEFAULT_INCLUDE = ("*.py",)
#: Hidden files and directories (editors' temporary files among them).
DEFAULT_EXCLUDE = (".*",)
#: Milliseconds of quiet after a change before reloading: an editor's save (or a checkout)
#: is several events, and should be one reload.
DEBOUNCE_MS = 300


class Patterns:
    """Which changed paths count: pure, so it is tested without a watcher."""

    def __init__(
        self, roots: Sequence[Path], include: Sequence[str] = (), exclude: Sequence[str] = ()
    ) -> None:
        self.roots = list(roots)
        self.include = (*DEFAULT_INCLUDE, *include)
        self.exclude = (*DEFAULT_EXCLUDE, *exclude)

    def relative(self, path: str) -> PurePath:
        """``path`` under the watched directory that holds it (itself if none does)."""
        full = PurePath(path)
        for root in self.roots:
            if full.is_relative_to(root):
                return full.relative_to(root)
        return full

    def wanted(self, path: str) -> bool:
        """True if a change to ``path`` should reload the workers."""
        rel = self.relative(path)
        text = rel.as_posix()
        for pattern in self.exclude:
            if fnmatch.fnmatch(text, pattern) or any(
                fnmatch.fnmatch(part, pattern) for part in rel.parts
            ):
                return False
        return any(
            fnmatch.fnmatch(rel.name, pattern) or fnmatch.fnmatch(text, pattern)
            for pattern in self.include
        )


class Reloader:
    """Watches ``dirs`` (default: the current directory); calls ``reload()`` on a change."""

    def __init__(
        self,
        dirs: Sequence[str],
        include: Sequence[str],
        exclude: Sequence[str],
        reload: Callable[[], Awaitable[bool]],
    ) -> None:
        self._dirs = list(dirs) or ["."]
        self._include = include
        self._exclude = exclude
        self._reload = reload
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Check the directories (ConfigError for one that is missing) and start watching."""
        roots = _roots(self._dirs)
        patterns = Patterns(roots, self._include, self._exclude)
        self._task = asyncio.create_task(self._watch(patterns), name="aiocluster-reload")
        log.info(
            "reload: watching %s for changes to %s (development: every change reloads)",
            ", ".join(map(str, roots)),
            ", ".join(patterns.include),
        )

    async def aclose(self) -> None:
        """Stop watching; idempotent."""
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self, patterns: Patterns) -> None:
        from watchfiles import Change, DefaultFilter, awatch

        always = DefaultFilter()
        # Its "N changes detected" would precede each of our own lines saying which.
        logging.getLogger("watchfiles").setLevel(logging.WARNING)

        def keep(change: Change, path: str) -> bool:
            return always(change, path) and patterns.wanted(path)

        try:
            async for changes in awatch(
                *patterns.roots,
                watch_filter=keep,
                stop_event=self._stop,
                debounce=DEBOUNCE_MS,
            ):
                names = sorted({patterns.relative(path).as_posix() for _, path in changes})
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if names[3:] else "")
                log.info("reload: %s changed; reloading the workers", shown)
                # Awaited here: changes made meanwhile are gathered by the watcher, and make
                # one more reload after this one.
                await self._reload()
        except Exception:
            log.exception("reload: the file watcher failed; --reload is off from now on")


def _roots(dirs: Sequence[str]) -> list[Path]:
    """The watched directories, absolute; ConfigError for one that does not exist."""
    roots = []
    for directory in dirs:
        root = Path(directory).absolute()
        if not root.is_dir():
            raise ConfigError(f"--reload-dir {directory}: no such directory")
        roots.append(root)
    return roots
