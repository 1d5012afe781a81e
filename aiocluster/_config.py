"""The one configuration object, validated once, shared by the API and the CLI."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._address import DEFAULT_HOST, DEFAULT_PORT, Address, parse_bind
from ._errors import ConfigError

__all__ = ["ClusterConfig", "default_workers"]


def default_workers() -> int:
    """The number of CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Everything the primary needs to run a cluster.

    Build it with :meth:`build`, which validates every value and says what is wrong.
    """

    workers: int
    binds: tuple[Address, ...]
    graceful_timeout: float = 30.0
    backlog: int = 2048
    use_uvloop: bool = True
    argv: tuple[str, ...] | None = field(default=None)

    @classmethod
    def build(
        cls,
        *,
        workers: int | None = None,
        host: str | None = None,
        port: int | None = None,
        path: str | None = None,
        bind: Sequence[str] | None = None,
        graceful_timeout: float = 30.0,
        backlog: int = 2048,
        use_uvloop: bool = True,
        argv: Sequence[str] | None = None,
    ) -> ClusterConfig:
        """Validate the options users pass to ``serve``/``run``/the CLI.

        ``bind`` specs (``HOST:PORT`` or ``unix:PATH``) add to ``host``/``port`` and ``path``;
        with none of them the cluster listens on 127.0.0.1:8000.
        """
        if workers is None:
            workers = default_workers()
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ConfigError(f"workers must be a positive integer, not {workers!r}")
        if not isinstance(graceful_timeout, int | float) or graceful_timeout < 0:
            raise ConfigError(f"graceful_timeout must be >= 0 seconds, not {graceful_timeout!r}")
        if not isinstance(backlog, int) or isinstance(backlog, bool) or backlog < 1:
            raise ConfigError(f"backlog must be a positive integer, not {backlog!r}")
        if isinstance(bind, str):
            bind = [bind]
        binds: list[Address] = [parse_bind(spec) for spec in bind or ()]
        if host is not None or port is not None:
            binds.insert(
                0, Address.tcp(host or DEFAULT_HOST, DEFAULT_PORT if port is None else port)
            )
        if path is not None:
            binds.append(Address.unix(path))
        if not binds:
            binds.append(Address.tcp(DEFAULT_HOST, DEFAULT_PORT))
        return cls(
            workers=workers,
            binds=tuple(binds),
            graceful_timeout=float(graceful_timeout),
            backlog=backlog,
            use_uvloop=use_uvloop,
            argv=tuple(argv) if argv is not None else None,
        )
